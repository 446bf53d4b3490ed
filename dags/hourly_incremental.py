"""Hourly incremental update of the user-ID embedding rows (DESIGN §5, §7), and the stream landed
as raw Parquet for the nightly run.

    consume -> check_lag
    archive
    record_run (teardown: runs after all three, whatever happened)

``consume`` runs the incremental consumer in bounded mode: it reads the topic up to the end
offsets it sees when it starts, applies every event-time hour that has closed (watermark past
the hour's end plus the allowed lateness) to the touched user rows in Redis, commits, and exits.
Which hours are closed is decided by event time inside the consumer, never by this run's wall
clock or logical date, so a replay of old data and a live topic behave the same. The consumer is
exactly-once in effect (each row records what it absorbed), so a retry is safe.

``archive`` runs the archiver (streaming.archiver) in bounded mode beside it, in its own
consumer group: every valid event the topic received since its last run is merged into
``raw/dt=D/part-hHH.parquet`` by event time, deduplicated by event_id, so the nightly run for a
day trains on exactly what the stream saw (late events land in their own hour whenever they
come). A failed archive fails the run (recorded as ``failed``, naming it): the next run lands
what this one did not, since its offsets are committed only after the events are on disk.

``check_lag`` fails the run loudly when the consumer is still more than
``AirflowConfig.lag_threshold`` records behind the log end after the run: the updater is falling
behind and user rows in Redis are going stale. The run record (kind ``incremental``) says
``lagging`` with the numbers. Before the first nightly publish there is nothing to update: the
run succeeds and records ``no_version``.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from airflow.sdk import CronDataIntervalTimetable, Param, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException

import _common as common
from twotower.config import load_settings

log = logging.getLogger("twotower.dags.hourly_incremental")
CFG = load_settings().airflow


@dag(
    dag_id="hourly_incremental",
    schedule=CronDataIntervalTimetable("0 * * * *", timezone="UTC"),
    start_date=dt.datetime(1990, 1, 1, tzinfo=dt.timezone.utc),
    catchup=False,
    max_active_runs=1,  # one consumer group member per run; overlapping runs would only rebalance
    default_args=common.default_args(CFG, CFG.hourly_timeout_s),
    params={"outcome_file": Param("", type="string", description="write the run outcome JSON here")},
    tags=["twotower", "incremental"],
    doc_md=__doc__,
)
def hourly_incremental():
    @task
    def consume() -> dict[str, Any]:
        """Bounded consumer run over the closed hours; returns its report (incl. ``lag``)."""
        from streaming.consumer import run_bounded

        ctx = get_current_context()
        with common.reported_errors(ctx["ti"]):
            # Stop cleanly (positions stored) before Airflow's execution timeout would kill the run.
            report = common.jsonable(run_bounded(load_settings(), max_seconds=0.9 * CFG.hourly_timeout_s))
        log.info("hourly run %s: consumer report %s", ctx["logical_date"], report)
        return report

    @task
    def archive() -> dict[str, Any]:
        """Bounded archiver run: the topic's new events landed as raw Parquet; returns its report."""
        from streaming.archiver import run_archiver

        ctx = get_current_context()
        with common.reported_errors(ctx["ti"]):
            report = common.jsonable(run_archiver(load_settings(), "bounded", max_seconds=0.9 * CFG.hourly_timeout_s))
        log.info("hourly run %s: archiver report %s", ctx["logical_date"], report)
        return report

    @task
    def check_lag(report: dict[str, Any]) -> str:
        """Fail loudly when the consumer is too far behind the topic after its run."""
        ctx = get_current_context()
        with common.reported_errors(ctx["ti"]):
            ok, why = common.check_lag(report, load_settings().airflow.lag_threshold)
            if not ok:
                raise AirflowFailException(why)
        log.info("hourly run %s: %s", ctx["logical_date"], why)
        return why

    # A teardown: it runs once every other task is done, whatever their states (there is no setup
    # task, so its all_done_setup_success rule is all_done), and its own state does not decide the
    # run's. One quick retry (e.g. Redis restarting); the outcome file is written before the record.
    @task(task_id="record_run", retries=min(CFG.retries, 1), retry_delay=dt.timedelta(seconds=30))
    def record_run() -> dict[str, Any]:
        """Record start, end, duration, status and data interval for `make status` (jobs.runs)."""
        return common.record_dag_run(
            get_current_context(),
            kind="incremental",
            task_ids=common.HOURLY_TASKS,
            period=dt.timedelta(hours=1),
            outcome=lambda states, errors, v: common.hourly_outcome(states, errors, v["consumer"], v["archive"]),
            xcoms={"consumer": ("consume", "return_value"), "archive": ("archive", "return_value")},
        )

    report = consume()
    checked = check_lag(report)
    landed = archive()
    [report, checked, landed] >> record_run().as_teardown()


hourly_incremental()

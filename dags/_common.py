"""What the project's DAG files share: task defaults, the logical day, readiness and outcome rules.

Imported when the scheduler parses the DAG files, so it imports only the standard library, the
Airflow task SDK and ``twotower.config``; anything heavy is imported inside the functions that
need it. The rules that decide a run's outcome are pure functions (tested without Airflow);
``record_dag_run`` is the thin glue that reads the run's task states and XComs and writes the
run record that ``make status`` reads (jobs.runs).

Listed in .airflowignore: it defines no DAG.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from airflow.sdk.exceptions import AirflowSkipException

from jobs.raw_ready import raw_day_ready  # noqa: F401 - the DAG's wait_for_raw sensor uses it
from twotower.config import AirflowConfig

log = logging.getLogger("twotower.dags")

# Task ids in pipeline order; outcome rules and the run record refer to them.
NIGHTLY_TASKS = ("wait_for_raw", "prepare", "train", "evaluate", "gate", "build_index", "validate_index", "publish")
HOURLY_TASKS = ("consume", "check_lag", "archive")
PUBLISH_MODES = ("auto", "force", "no")
ERROR_XCOM_KEY = "error"


def default_args(cfg: AirflowConfig, timeout_s: int) -> dict[str, Any]:
    """Task defaults of a DAG: retries with a delay and a per-task execution timeout."""
    return {
        "owner": "recsys",
        "retries": cfg.retries,
        "retry_delay": dt.timedelta(seconds=cfg.retry_delay_s),
        "execution_timeout": dt.timedelta(seconds=timeout_s),
    }


def logical_day(context: Mapping[str, Any]) -> dt.date:
    """The UTC calendar day a nightly run processes: the date of its logical date.

    A scheduled run of the daily timetable has logical date D 00:00 UTC (its data interval is
    D..D+1) and starts once D is over; ``airflow dags test full_retrain D`` and backfills use D
    directly. Raises ValueError for a run triggered without a logical date, because guessing
    the day from the wall clock would make the run non-reproducible.
    """
    when = context.get("logical_date")
    if when is None:
        raise ValueError(
            "this run has no logical date, so it cannot tell which day to process; trigger it with "
            "one (airflow dags trigger full_retrain --logical-date YYYY-MM-DD) or use make backfill DATE=..."
        )
    return when.astimezone(dt.timezone.utc).date()


def logical_interval(context: Mapping[str, Any], period: dt.timedelta) -> tuple[str, str]:
    """[logical date, logical date + period) as ISO strings: the data a run covers.

    Airflow's own data interval differs between scheduled runs (starts at the logical date) and
    ``dags test`` runs (ends at it), so the record uses this one rule for both.
    """
    when = context.get("logical_date")
    if when is None:
        return "", ""
    start = dt.datetime.fromtimestamp(when.timestamp(), tz=dt.timezone.utc)  # stdlib, not pendulum
    return start.isoformat(), (start + period).isoformat()


def check_index_recall(meta: Mapping[str, Any], floor: float) -> tuple[bool, str]:
    """Whether an index's measured ANN recall@100 (from index.json) reaches the floor."""
    recall = meta.get("ann_recall_at_100")
    if recall is None:
        return False, "index.json has no measured ann_recall_at_100; the index cannot be trusted"
    recall = float(recall)
    kind = f"{meta.get('factory') or meta.get('type')}, nprobe={meta.get('nprobe')}"
    if recall < floor:
        return False, f"ANN recall@100 {recall:.4f} of the index ({kind}) is below the floor {floor:.4f}"
    fallback = f"; fallback: {meta['fallback']}" if meta.get("fallback") else ""
    return True, f"ANN recall@100 {recall:.4f} >= floor {floor:.4f} ({kind}{fallback})"


def check_lag(report: Mapping[str, Any], threshold: int) -> tuple[bool, str]:
    """Whether a bounded consumer run (streaming.consumer report) left the updater healthy.

    Fails when the lag (records behind the log end, all partitions) is above ``threshold``,
    when the run got no partitions (another member of the group owns them all, e.g. a
    continuous consumer of the same group) and when no lag was reported. A run with no
    published version yet passes: there are no rows to update, and the nightly run is what
    is missing.
    """
    status = report.get("status", "ok")
    if status == "no_version":
        return True, "no model version is published yet, so there are no user rows to update (lag not measured)"
    if status == "no_partitions":
        return False, (
            "the consumer was assigned no partitions: another member of its consumer group owns them all "
            "(is a continuous consumer of the same group running?), so this run updated nothing"
        )
    lag = report.get("lag")
    if lag is None:
        return False, f"the consumer (status {status}) did not report its lag, so falling behind cannot be ruled out"
    lag = int(lag)
    stopped = " (it stopped at its time limit)" if status == "time_limit" else ""
    if lag > threshold:
        return False, (
            f"consumer lag is {lag:,} records after the hourly run{stopped}, above the threshold of {threshold:,}: "
            "the incremental updater is falling behind the topic (user rows in Redis are going stale)"
        )
    return True, f"consumer lag {lag:,} records (threshold {threshold:,}){stopped}"


def nightly_outcome(
    states: Mapping[str, str], errors: Mapping[str, str], gate: Mapping[str, Any] | None, publish: Mapping[str, Any] | None
) -> tuple[str, str]:
    """(status, reason) of a nightly run from its task states. Pure.

    Status vocabulary (the same as jobs.nightly.run_nightly): ``published`` (pointer switched),
    ``not_published`` (publish ran but kept the serving version, e.g. an older data cutoff
    without force), ``gated`` (the quality gate stopped the publish), ``built`` (publish=no),
    ``failed`` (a task failed; the reason names it).
    """
    for task_id in NIGHTLY_TASKS:
        if states.get(task_id) != "failed":
            continue
        if task_id == "gate" and gate and not gate.get("passed", True):
            return "gated", f"quality gate stopped the publish: {gate.get('reason', '')}"
        return "failed", f"{task_id} failed: {errors.get(task_id) or 'see the task log'}"
    published = states.get("publish")
    if published == "skipped":
        return "built", "publish=no: the version was built, evaluated and indexed but not published"
    if published == "success":
        publish = publish or {}
        if publish.get("switched"):
            return "published", f"serving pointer switched to {publish.get('version', '?')}"
        why = publish.get("reason") or publish.get("message") or "publish_version kept the serving version"
        return "not_published", why
    unfinished = {t: s for t, s in states.items() if s not in ("success", "skipped")}
    return "failed", f"the run ended with unfinished or failed tasks: {unfinished}"


def hourly_outcome(
    states: Mapping[str, str], errors: Mapping[str, str], report: Mapping[str, Any] | None, archive: Mapping[str, Any] | None = None
) -> tuple[str, str]:
    """(status, reason) of an hourly run from its task states, errors and the consumer's and the
    archiver's reports. Pure.

    ``ok``; ``no_version`` (nothing published yet, nothing to update); ``lagging`` (check_lag
    failed: the reason has the numbers); ``failed`` (the consumer run or the archive failed).
    """
    if states.get("consume") == "failed":
        return "failed", f"consume failed: {errors.get('consume') or 'see the task log'}"
    if states.get("archive") == "failed":
        return "failed", (
            "archive failed, so the stream's latest events are not in raw Parquet yet (the next run lands them; a nightly "
            f"run before that would train without them): {errors.get('archive') or 'see the task log'}"
        )
    if states.get("check_lag") == "failed":
        return "lagging", errors.get("check_lag") or "consumer lag above the threshold"
    if states.get("check_lag") == "success" and states.get("archive", "success") == "success":
        report = report or {}
        landed = (
            f"; {archive.get('events_written', 0)} new event(s) landed as raw Parquet ({archive.get('duplicates_skipped', 0)} already there)"
            if archive else ""
        )
        if report.get("status") == "no_version":
            return "no_version", f"no model version is published yet; nothing to update{landed}"
        return "ok", (
            f"{report.get('hours_applied', 0)} closed hour(s) applied to {report.get('users_updated', 0)} user row(s); "
            f"lag {report.get('lag')} records{landed}"
        )
    return "failed", f"the run ended with unfinished tasks: {dict(states)}"


def jsonable(value: Any) -> Any:
    """A JSON-safe copy (dates and paths as strings) for XCom and run records."""
    return json.loads(json.dumps(value, default=str))


@contextlib.contextmanager
def reported_errors(ti: Any) -> Iterator[None]:
    """Push a failing task's error (type and message) to XCom so the run record can say why."""
    try:
        yield
    except AirflowSkipException:
        raise
    except BaseException as exc:
        ti.xcom_push(key=ERROR_XCOM_KEY, value=f"{type(exc).__name__}: {exc}"[:2000])
        raise


def run_started_at(dag_run: Any) -> float:
    """Epoch seconds the run started.

    ``dag_run.start_date`` is when the scheduler started the run, except under
    ``airflow dags test``, which sets it to the logical date; ``run_after`` is never later than
    the real start, so the later of the two is right in both cases.
    """
    stamps = [d for d in (getattr(dag_run, "start_date", None), getattr(dag_run, "run_after", None)) if d is not None]
    return max(stamps).timestamp() if stamps else time.time()


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON to ``path`` via a temporary file and rename (readers never see half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def record_dag_run(
    context: Mapping[str, Any],
    *,
    kind: str,
    task_ids: tuple[str, ...],
    period: dt.timedelta,
    outcome: Callable[[dict[str, str], dict[str, str], dict[str, Any]], tuple[str, str]],
    xcoms: Mapping[str, tuple[str, str]],
) -> dict[str, Any]:
    """Record a finished run (start, end, duration, status, data interval, per-task states).

    Runs as the DAG's teardown: reads the other tasks' states and durations and the XComs named
    in ``xcoms`` ({name: (task_id, key)}), decides the status with ``outcome(states, errors, values)``,
    writes the outcome to ``params.outcome_file`` when one is given (backfill reads it), then
    calls jobs.runs.record_run. Returns the record.
    """
    from twotower.config import load_settings

    ti, dag_run, params = context["ti"], context["dag_run"], context["params"]
    crumbs = {c["task_id"]: c for c in ti.get_task_breadcrumbs(dag_id=ti.dag_id, run_id=ti.run_id)}
    states = {t: str(getattr(crumbs[t]["state"], "value", crumbs[t]["state"])) for t in task_ids if t in crumbs}
    seconds = {t: round(float(crumbs[t]["duration"] or 0.0), 3) for t in task_ids if t in crumbs}
    errors = {t: e for t in task_ids if (e := ti.xcom_pull(task_ids=t, key=ERROR_XCOM_KEY))}
    values = {name: ti.xcom_pull(task_ids=task_id, key=key) for name, (task_id, key) in xcoms.items()}
    status, reason = outcome(states, errors, values)
    started, finished = run_started_at(dag_run), time.time()
    start, end = logical_interval(context, period)
    record = {
        "kind": kind,
        "dag_id": ti.dag_id,
        "run_id": ti.run_id,
        "logical_date": start[:10] if period >= dt.timedelta(days=1) else start,
        "data_interval_start": start,
        "data_interval_end": end,
        "started_at": started,
        "finished_at": finished,
        "duration_s": round(finished - started, 3),
        "status": status,
        "reason": reason,
        "task_states": states,
        "task_seconds": seconds,
        "errors": errors,
        "conf": jsonable(dict(params)),
        **{name: jsonable(v) for name, v in values.items()},
    }
    if values.get("artifact_dir"):
        record["version"] = Path(values["artifact_dir"]).name  # what `make status` shows
    level = logging.INFO if status in ("published", "built", "ok", "no_version") else logging.WARNING
    log.log(level, "%s run %s (%s): %s - %s", kind, record["logical_date"], ti.run_id, status, reason)
    if params.get("outcome_file"):
        write_json_atomic(Path(params["outcome_file"]), record)
    from jobs.runs import record_run

    details = {k: v for k, v in record.items() if k not in ("kind", "logical_date", "started_at", "finished_at", "status")}
    record_run(
        load_settings(),
        kind=kind,
        logical_date=record["logical_date"],
        started_at=started,
        finished_at=finished,
        status=status,
        details=details,
    )
    return record

"""Nightly full retrain of the two-tower recall model (DESIGN §7).

    wait_for_raw -> prepare -> train -> evaluate -> gate -> build_index -> validate_index -> publish
    record_run (teardown: runs after all of them, whatever happened)

**Which day.** The run with logical date D processes the raw events up to the end of D (UTC):
the daily timetable gives scheduled runs the data interval D..D+1 and starts them once D is over;
``airflow dags test full_retrain D`` and ``make backfill DATE=D`` use D directly. No task reads
the wall clock to decide what data to use.

**Params.** ``publish``: ``auto`` (default) publishes when the quality gate passes; ``force``
publishes even over a failed gate or a serving version with a newer data cutoff (the only way to
move the pointer back); ``no`` builds, evaluates and indexes the version but publishes nothing.
``outcome_file``: where the teardown writes the run's outcome as JSON (backfill uses it).

**Quality gate.** With ``publish=auto`` a regression beyond the configured threshold *fails* the
gate task with the reason (metric, candidate vs serving value, threshold), so index and publish
do not run, the run shows red, and the run record says ``gated`` with the same reason: a model
that could not ship means the serving model is getting older, which on-call should see. Verdicts
(gate, index recall, sensor timeout) raise AirflowFailException, which skips the retries (the
same model gives the same answer); infrastructure errors (Redis, files) are retried.
``force`` and ``no`` log the gate's verdict and go on.

**Tasks are transactions**: each stage writes its partition or version whole or not at all
(jobs.nightly), so a retry or a re-run of the same day is safe and gives the same result.
Heavy imports (Spark, torch, faiss) happen inside the tasks; this file only wires them.
The index task runs in the ``gpu`` pool (one build per GPU) and picks the GPU when faiss sees
one, the CPU otherwise (IndexConfig.use_gpu).
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path
from typing import Any

from airflow.sdk import CronDataIntervalTimetable, Param, PokeReturnValue, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

import _common as common
from twotower.config import load_settings

log = logging.getLogger("twotower.dags.full_retrain")
CFG = load_settings().airflow


def _current() -> tuple[Any, dt.date, Any]:
    """(settings, logical day, context) of the running task."""
    context = get_current_context()
    return load_settings(), common.logical_day(context), context


@dag(
    dag_id="full_retrain",
    schedule=CronDataIntervalTimetable("0 0 * * *", timezone="UTC"),
    start_date=dt.datetime(1990, 1, 1, tzinfo=dt.timezone.utc),
    catchup=False,
    max_active_runs=1,
    default_args=common.default_args(CFG, CFG.task_timeout_s),
    params={
        "publish": Param("auto", type="string", enum=list(common.PUBLISH_MODES), description="auto | force | no"),
        "outcome_file": Param("", type="string", description="write the run outcome JSON here (used by backfill)"),
    },
    tags=["twotower", "nightly"],
    doc_md=__doc__,
)
def full_retrain():
    @task.sensor(
        task_id="wait_for_raw",
        poke_interval=CFG.raw_poke_interval_s,
        timeout=CFG.raw_wait_timeout_s,
        mode="reschedule",
    )
    def wait_for_raw() -> PokeReturnValue:
        """Done when the day's raw partition exists (or a later day's: D is closed and empty)."""
        settings, day, _ = _current()
        ready, why = common.raw_day_ready(settings.paths.raw_dir, day)
        log.info("%s: %s", day, why)
        return PokeReturnValue(is_done=ready, xcom_value=why)

    @task
    def prepare() -> str:
        """Spark: the W-day window ending at D -> prepared/dt=D (complete or absent)."""
        from jobs.nightly import stage_prepare

        settings, day, ctx = _current()
        with common.reported_errors(ctx["ti"]):
            return str(stage_prepare(settings, day))

    @task
    def train(prepared_dir: str) -> str:
        """Both towers from scratch on D's partition; returns the artifact directory."""
        from jobs.nightly import stage_train

        settings, day, ctx = _current()
        with common.reported_errors(ctx["ti"]):
            artifact_dir = stage_train(settings, day)
        log.info("%s: trained version %s from %s", day, artifact_dir.name, prepared_dir)
        return str(artifact_dir)

    @task
    def evaluate(artifact_dir: str) -> dict[str, Any]:
        """Exact full-corpus metrics (and the popularity baseline) into metrics.json."""
        from jobs.nightly import stage_evaluate

        settings, day, ctx = _current()
        with common.reported_errors(ctx["ti"]):
            return common.jsonable(stage_evaluate(settings, Path(artifact_dir), day))

    @task
    def gate(artifact_dir: str, metrics: dict[str, Any]) -> dict[str, Any]:
        """Compare with the serving version; with publish=auto a regression fails this task."""
        from dataclasses import asdict, is_dataclass

        from jobs.nightly import stage_gate

        settings, day, ctx = _current()
        mode = ctx["params"]["publish"]
        with common.reported_errors(ctx["ti"]):
            verdict = stage_gate(settings, Path(artifact_dir))
            result = common.jsonable(asdict(verdict) if is_dataclass(verdict) else dict(verdict))
            ctx["ti"].xcom_push(key="gate", value=result)  # kept when this task fails: the record says why
            if result.get("passed"):
                log.info("%s: quality gate passed: %s", day, result.get("reason", ""))
            elif mode == "auto":
                raise AirflowFailException(
                    f"quality gate stopped the publish of {Path(artifact_dir).name}: {result.get('reason', '')}; "
                    "the serving version is unchanged (publish=force overrides)"
                )
            else:
                log.warning("%s: quality gate failed (%s), going on because publish=%s", day, result.get("reason"), mode)
        return result

    @task(pool=CFG.gpu_pool, queue=CFG.gpu_queue)
    def build_index(artifact_dir: str, gate_result: dict[str, Any]) -> dict[str, Any]:
        """IVF-PQ index, nprobe tuned to the target recall; GPU when faiss sees one."""
        from jobs.nightly import stage_index

        settings, day, ctx = _current()
        with common.reported_errors(ctx["ti"]):
            meta = stage_index(settings, Path(artifact_dir), day)
        keep = ("type", "factory", "nlist", "m", "nbits", "nprobe", "k_factor", "ann_recall_at_100", "device", "fallback", "build_seconds", "ann")
        return common.jsonable({k: meta.get(k) for k in keep})

    @task
    def validate_index(artifact_dir: str, index_meta: dict[str, Any]) -> str:
        """Refuse the version when index.json's measured recall@100 is below the floor."""
        import json

        from twotower.contracts import ARTIFACT_FILES

        settings, day, ctx = _current()
        with common.reported_errors(ctx["ti"]):
            meta = json.loads((Path(artifact_dir) / ARTIFACT_FILES["index_meta"]).read_text())
            ok, why = common.check_index_recall(meta, settings.index.recall_floor)
            if not ok:
                raise AirflowFailException(f"{Path(artifact_dir).name}: {why}; nothing is published")
        log.info("%s: index of %s validated: %s", day, Path(artifact_dir).name, why)
        return why

    @task
    def publish(artifact_dir: str, validated: str) -> dict[str, Any]:
        """Write the version to Redis and switch the pointer (publish_version decides; force overrides)."""
        from jobs.nightly import stage_publish

        settings, day, ctx = _current()
        mode = ctx["params"]["publish"]
        if mode == "no":
            raise AirflowSkipException("publish=no: the version is built and indexed, not published")
        with common.reported_errors(ctx["ti"]):
            result = common.jsonable(stage_publish(settings, Path(artifact_dir), force=mode == "force"))
        result.setdefault("version", Path(artifact_dir).name)
        if result.get("switched"):
            log.info("%s: serving pointer switched to %s (publish=%s)", day, result["version"], mode)
        else:
            log.warning("%s: %s published but the pointer was not moved: %s", day, result["version"], result.get("reason"))
        return result

    # A teardown: it runs once every other task is done, whatever their states (there is no setup
    # task, so its all_done_setup_success rule is all_done), and its own state does not decide the
    # run's. One quick retry (e.g. Redis restarting); the outcome file is written before the record.
    @task(task_id="record_run", retries=min(CFG.retries, 1), retry_delay=dt.timedelta(seconds=30))
    def record_run() -> dict[str, Any]:
        """Record start, end, duration, status and data interval for `make status` (jobs.runs)."""
        return common.record_dag_run(
            get_current_context(),
            kind="full_retrain",
            task_ids=common.NIGHTLY_TASKS,
            period=dt.timedelta(days=1),
            outcome=lambda states, errors, v: common.nightly_outcome(states, errors, v["gate"], v["publish"]),
            xcoms={
                "artifact_dir": ("train", "return_value"),
                "metrics": ("evaluate", "return_value"),
                "gate": ("gate", "gate"),
                "index": ("build_index", "return_value"),
                "publish": ("publish", "return_value"),
            },
        )

    raw = wait_for_raw()
    prepared = prepare()
    raw >> prepared
    artifact = train(prepared)
    metrics = evaluate(artifact)
    verdict = gate(artifact, metrics)
    meta = build_index(artifact, verdict)
    validated = validate_index(artifact, meta)
    published = publish(artifact, validated)
    [raw, prepared, artifact, metrics, verdict, meta, validated, published] >> record_run().as_teardown()


full_retrain()

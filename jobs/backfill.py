"""Reprocess days through the nightly DAG: ``make backfill DATE=D`` or ``START=A END=B`` [``PUBLISH=...``].

Each day, oldest first (prepare extends the vocabulary of the latest earlier partition), runs

    airflow dags test full_retrain D -c '{"publish": P, "outcome_file": ...}'

in a subprocess with ``infra.airflow_env.airflow_env``: the same DAG file and tasks as the
nightly schedule, executed synchronously and recorded in the run history ``make status`` reads.
Why not ``airflow backfill create``: it only creates runs for a scheduler to pick up later, so it
needs ``make airflow`` running, returns before anything is done, and cannot report what happened
per day; ``dags test`` needs no scheduler, works on SQLite and finishes before the next day starts.
(With ``make airflow`` up, ``airflow backfill create --dag-id full_retrain --from-date A --to-date B
--dag-run-conf '{"publish": "auto"}'`` is the UI-visible alternative.)

The backfill's runs live in their own Airflow metadata DB (``<AIRFLOW_HOME>-backfill``): a
``dags test`` run is an ordinary running DAG run, and a scheduler of ``make airflow`` sharing the
DB would start queueing its tasks as well, running every stage twice.

Idempotent: every stage is a transaction keyed by the day (prepared/dt=D, artifacts/<version>
with a version derived from the data and config), so running a backfill twice leaves the same
partitions and artifacts. The serving pointer is never moved back to an older data cutoff unless
``publish="force"``: publish_version refuses it, and each day's result says what happened.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from pathlib import Path
from typing import Any

from infra.airflow_env import airflow_env, airflow_home, dags_test, prepare_airflow
from twotower.config import Settings

log = logging.getLogger(__name__)

DAG_ID = "full_retrain"
PUBLISH_MODES = ("auto", "force", "no")


def backfill_days(start: dt.date, end: dt.date) -> list[dt.date]:
    """The days ``start..end`` inclusive, oldest first. Raises ValueError when end < start."""
    if end < start:
        raise ValueError(f"backfill end {end} is before its start {start}")
    return [start + dt.timedelta(days=i) for i in range((end - start).days + 1)]


def backfill_settings(settings: Settings) -> Settings:
    """``settings`` with the backfill's own Airflow home beside the scheduler's (see module docstring)."""
    home = airflow_home(settings)
    return settings.replace("airflow", home=str(home.parent / f"{home.name}-backfill"))


def describe(result: dict[str, Any]) -> str:
    """One line, in words, of what a backfilled day did to the serving pointer. Pure."""
    day, status, version = result["logical_date"], result["status"], result.get("version") or "no version"
    reason = result.get("reason", "")
    if status == "published":
        return f"{day}: {version} published; the serving pointer now points at it (publish={result['publish']})"
    if status == "not_published":
        hint = "" if result["publish"] == "force" else " (PUBLISH=force would move it)"
        return f"{day}: {version} rebuilt; serving pointer NOT moved: {reason}{hint}"
    if status == "built":
        return f"{day}: {version} rebuilt (PUBLISH=no); serving pointer untouched"
    if status == "gated":
        return f"{day}: {version} rebuilt; serving pointer NOT moved: {reason}"
    return f"{day}: FAILED, serving pointer untouched: {reason}"


def _day_result(day: dt.date, publish: str, rc: int, outcome: dict[str, Any] | None, seconds: float, log_path: Path) -> dict[str, Any]:
    """The per-day result from the DAG run's outcome file (or its absence). Pure."""
    if outcome is None:
        status = "failed"
        reason = f"airflow dags test exited with code {rc} before the run recorded an outcome; see {log_path}"
        outcome = {}
    else:
        status, reason = outcome.get("status", "failed"), outcome.get("reason", "")
    artifact_dir = outcome.get("artifact_dir") or ""
    published = outcome.get("publish") or {}
    return {
        "logical_date": day.isoformat(),
        "publish": publish,
        "status": status,
        "reason": reason,
        "version": Path(artifact_dir).name if artifact_dir else "",
        "artifact_dir": artifact_dir,
        "switched": bool(published.get("switched")),
        "airflow_exit_code": rc,
        "run_id": outcome.get("run_id", ""),
        "seconds": round(seconds, 1),
        "log": str(log_path),
    }


def backfill(settings: Settings, start: dt.date, end: dt.date, publish: str = "auto") -> list[dict[str, Any]]:
    """Run the nightly DAG for each day ``start..end``; returns one result per day, oldest first.

    Result keys: logical_date, publish, status (published | not_published | gated | built |
    failed), reason, version, artifact_dir, switched, airflow_exit_code, run_id, seconds, log.
    A failed day is reported and the backfill goes on with the next one. Each day is recorded
    as a ``full_retrain`` run by the DAG, and the whole backfill as one ``backfill`` run.
    """
    if publish not in PUBLISH_MODES:
        raise ValueError(f"publish must be one of {', '.join(PUBLISH_MODES)}, got {publish!r}")
    days = backfill_days(start, end)
    started = time.time()
    settings = backfill_settings(settings)
    env = airflow_env(settings)
    prepare_airflow(settings, env)
    out_dir = airflow_home(settings) / "runs"
    log.info("backfill of %d day(s) %s..%s through the %s DAG, publish=%s", len(days), start, end, DAG_ID, publish)
    results = []
    for n, day in enumerate(days, 1):
        outcome_path = out_dir / f"{DAG_ID}_{day.isoformat()}.json"
        log_path = out_dir / f"{DAG_ID}_{day.isoformat()}.log"
        outcome_path.unlink(missing_ok=True)  # a stale outcome must never be read as this run's
        log.info("backfill day %d/%d: %s (Airflow output: %s)", n, len(days), day, log_path)
        t0 = time.time()
        rc = dags_test(
            settings,
            DAG_ID,
            day.isoformat(),
            {"publish": publish, "outcome_file": str(outcome_path)},
            log_path=log_path,
            timeout_s=settings.airflow.backfill_day_timeout_s,
            env=env,
        )
        outcome = json.loads(outcome_path.read_text()) if outcome_path.exists() else None
        result = _day_result(day, publish, rc, outcome, time.time() - t0, log_path)
        (log.info if result["status"] != "failed" else log.error)("%s (%.0f s)", describe(result), result["seconds"])
        results.append(result)
    failed = [r["logical_date"] for r in results if r["status"] == "failed"]
    from jobs.runs import record_run

    record_run(
        settings,
        kind="backfill",
        logical_date=start.isoformat() if start == end else f"{start.isoformat()}..{end.isoformat()}",
        started_at=started,
        finished_at=time.time(),
        status="failed" if failed else "ok",
        details={"publish": publish, "days": results},
    )
    log.info(
        "backfill done: %d day(s), %d published, %d failed%s",
        len(results), sum(r["status"] == "published" for r in results), len(failed), f" ({', '.join(failed)})" if failed else "",
    )  # fmt: skip
    return results

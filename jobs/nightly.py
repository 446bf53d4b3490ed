"""The nightly full retrain as typed stage functions (DESIGN §2, §7).

Each stage is a transaction: it writes its output whole or not at all, reads only the logical
date (never the wall clock) for what data it uses, and leaves the previous good output in place
when it fails. The Airflow DAG (dags/full_retrain.py) calls these same functions one task each;
``run_nightly`` chains them for ``make run`` and tests.

    prepare(D) -> prepared/dt=D/                       (jobs.prepare, Spark)
    train(D)   -> artifacts/<version>/ (model, item vectors, vocabularies)   (jobs.train)
    evaluate   -> metrics.json: exact full-corpus ranking + popularity baseline (jobs.evaluate)
    gate       -> compare with the serving version; a regression stops the publish (jobs.gate)
    index      -> index.faiss + index.json, ANN metrics added to metrics.json (jobs.index)
    publish    -> Redis rows, histories, metadata; pointer switched last (jobs.publish)
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from streaming.faults import crash_point
from twotower.config import Settings
from twotower.contracts import prepared_partition

log = logging.getLogger(__name__)


def stage_prepare(settings: Settings, day: dt.date) -> Path:
    """Spark: raw events of the window ending at ``day`` -> the complete prepared partition."""
    from jobs.prepare import run_prepare
    from jobs.prepare_io import PrepareError
    from jobs.raw_ready import raw_day_ready

    # Without D's events the version would claim data through D, the hourly path would start
    # after D, and D's events would reach no row (Airflow's sensor waits; direct runs stop here).
    ready, why = raw_day_ready(settings.paths.raw_dir, day)
    if not ready:
        raise PrepareError(f"{why}: the run for {day} would publish data that stops before {day}; nothing was written")
    return run_prepare(settings, day)


def stage_train(settings: Settings, day: dt.date) -> Path:
    """Train both towers from scratch on D's prepared partition; returns the artifact directory."""
    from jobs.train import train_version

    return train_version(settings, prepared_partition(settings.paths.prepared_dir, day))


def stage_evaluate(settings: Settings, artifact_dir: Path, day: dt.date) -> dict[str, Any]:
    """Exact-search offline metrics of the version (and the popularity baseline beside it)."""
    from jobs.evaluate import evaluate_exact

    return evaluate_exact(settings, artifact_dir, prepared_partition(settings.paths.prepared_dir, day))


def stage_gate(settings: Settings, artifact_dir: Path):
    """Quality gate against the serving version; returns a GateResult (``passed``, ``reason``)."""
    from jobs.gate import check_gate

    return check_gate(settings, artifact_dir)


def stage_index(settings: Settings, artifact_dir: Path, day: dt.date) -> dict[str, Any]:
    """Build, tune and validate the IVF-PQ index; returns the index metadata."""
    from jobs.index import build_index

    return build_index(settings, artifact_dir, prepared_partition(settings.paths.prepared_dir, day))


def stage_publish(settings: Settings, artifact_dir: Path, force: bool = False) -> dict[str, Any]:
    """Write the version to Redis and switch the pointer; returns what was published."""
    from jobs.publish import publish_version

    return publish_version(settings, artifact_dir, force=force, on_batch=lambda *_: crash_point("nightly_mid_publish"))


@dataclass
class NightlyResult:
    """Outcome of one nightly run."""

    logical_date: str
    version: str = ""
    artifact_dir: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    index: dict[str, Any] = field(default_factory=dict)
    gate: dict[str, Any] = field(default_factory=dict)
    published: bool = False
    publish: dict[str, Any] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    status: str = "running"
    error: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_nightly(settings: Settings, day: dt.date, publish: str = "auto") -> NightlyResult:
    """prepare -> train -> evaluate -> gate -> index -> publish for logical date ``day``.

    ``publish``: ``auto`` publishes when the gate passes; ``force`` publishes even over a
    failed gate or a newer serving version; ``no`` stops after the index. Records the run in
    Redis (jobs.runs) whatever happens, then re-raises a failure.
    """
    from jobs.runs import record_run

    result = NightlyResult(logical_date=day.isoformat())
    started = time.time()

    def timed(name: str, fn, *args, **kwargs):
        t0 = time.time()
        log.info("nightly %s: %s starting", day, name)
        out = fn(*args, **kwargs)
        result.stage_seconds[name] = round(time.time() - t0, 3)
        log.info("nightly %s: %s done in %.1f s", day, name, result.stage_seconds[name])
        return out

    try:
        timed("prepare", stage_prepare, settings, day)
        crash_point("nightly_after_prepare")  # fault tests only (streaming.faults); no-op otherwise
        artifact_dir = timed("train", stage_train, settings, day)
        crash_point("nightly_after_train")
        result.artifact_dir, result.version = str(artifact_dir), artifact_dir.name
        result.metrics = timed("evaluate", stage_evaluate, settings, artifact_dir, day)
        gate = timed("gate", stage_gate, settings, artifact_dir)
        result.gate = asdict(gate)
        result.index = timed("index", stage_index, settings, artifact_dir, day)
        if "ann" in result.index:  # the index stage measures the same metrics through the index
            result.metrics["ann"] = result.index.pop("ann")
        crash_point("nightly_after_index")
        if publish == "no":
            result.status = "built"
        elif gate.passed or publish == "force":
            result.publish = timed("publish", stage_publish, settings, artifact_dir, force=publish == "force")
            result.published = bool(result.publish.get("switched"))
            result.status = "published" if result.published else "not_published"
        else:
            result.status = "gated"
            log.warning("nightly %s: quality gate stopped the publish: %s", day, gate.reason)
    except BaseException as exc:
        result.status, result.error = "failed", f"{type(exc).__name__}: {exc}"
        log.error("nightly %s failed: %s; the serving version is unchanged", day, result.error)
        raise
    finally:
        record_run(
            settings,
            kind="full_retrain",
            logical_date=day.isoformat(),
            started_at=started,
            finished_at=time.time(),
            status=result.status,
            details={k: v for k, v in result.as_dict().items() if k not in ("logical_date", "status")},
        )
    return result

"""How fresh is everything the serving layer reads (GET /freshness, /freshness/history, /metrics).

    gather(settings, client)       Redis -> raw inputs: status_json, the serving version's
                                   metadata, the latest full-retrain run, the incremental
                                   consumer's status                              (I/O)
    derive(raw, now_ms, cfg)       raw inputs -> one flat dict of ages, lags, flags  (pure)
    record_sample / read_samples   freshness samples kept in Redis sorted sets, so the
                                   dashboard's history survives server restarts      (I/O)
    hourly_counts                  users updated / events applied per event-time hour, from
                                   the incremental consumer's per-hour counters       (I/O)

Definitions (all ages in seconds, all timestamps epoch milliseconds UTC):
    model_age_s          now - the serving version's ``trained_at`` (published_at when absent)
    incremental_age_s    now - the consumer's last publish of user rows (wall clock)
    watermark_lag_s      now - the consumer's event-time watermark (a replay of old data lags by
                         the age of the data: that is what event-time lag means)
    model_stale          no version, or model_age_s > serving.model_stale_s (36 h)
    incremental_stale    a version serves and nothing incremental was published for
                         serving.incremental_stale_s (2 h); with no incremental publish ever,
                         counted from the version's publish time
    watermark_stale      watermark_lag_s > serving.watermark_stale_s (shown, not in the banner:
                         replays of historical data always lag)
    archive_age_s        now - the archiver's last run (streaming.archiver: the topic landed as
                         raw Parquet for the nightly run); None when it never ran here
    archive_stale        a version serves and the archiver last ran more than
                         serving.incremental_stale_s ago (it runs beside the consumer every hour)

Freshness sample keys (one sorted set per metric, score = sample time ms, member
``"<ms>:<value>"``; trimmed to ``serving.history_hours``):

    <p>:fresh:<metric>     e.g. <p>:fresh:incremental_age_s
    <p>:fresh:last         string, set NX with a TTL: at most one sample per interval across
                           all server processes
"""

from __future__ import annotations

import logging
from typing import Any

import redis

from twotower.config import ServingConfig, Settings

log = logging.getLogger(__name__)

HOUR_MS = 3_600_000
SAMPLED = ("model_age_s", "incremental_age_s", "watermark_lag_s", "consumer_lag_total", "dead_letters")
"""Derived values recorded as history samples (the dashboard charts the first three)."""
METRIC_KEYS = ("hit@10", "hit@50", "hit@100", "ndcg@10")


def sample_key(prefix: str, metric: str) -> str:
    """Sorted set of one metric's freshness samples."""
    return f"{prefix}:fresh:{metric}"


def sample_guard_key(prefix: str) -> str:
    """Marker that throttles sampling to one sample per interval across processes."""
    return f"{prefix}:fresh:last"


# --- gather (I/O) ---------------------------------------------------------------------------------


def gather(settings: Settings, client: redis.Redis) -> dict[str, Any]:
    """Everything ``derive`` needs, read from Redis now.

    Returns {"status": jobs.status.status_json, "meta": the current version's metadata or None,
    "retrain": the newest full_retrain run record or None, "incremental":
    streaming.status.incremental_status or None, "archive": the archiver's record
    (streaming.status.archive_record, epoch ms) or None}.
    """
    from jobs.status import status_with_records

    status, records = status_with_records(settings, client)
    return {"status": status, **records}


# --- derive (pure) --------------------------------------------------------------------------------


def human_duration(seconds: float) -> str:
    """``45 s``, ``12 min``, ``3.5 h``, ``2.0 d`` (what stale reasons say). Pure."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _age_s(now_ms: int, then_ms: int | float | None) -> float | None:
    return None if then_ms is None else round(max(0.0, (now_ms - float(then_ms)) / 1000.0), 3)


def _pick_metrics(metrics: dict[str, Any] | None) -> dict[str, float]:
    """hit@10/50/100 and ndcg@10 of exact search, plus ``ann hit@..`` through the index."""
    if not isinstance(metrics, dict):
        return {}
    exact = metrics.get("exact", metrics)
    out = {k: float(exact[k]) for k in METRIC_KEYS if isinstance(exact, dict) and exact.get(k) is not None}
    ann = metrics.get("ann")
    if isinstance(ann, dict):
        out.update({f"ann {k}": float(ann[k]) for k in METRIC_KEYS if ann.get(k) is not None})
    return out


def retrain_view(run: dict[str, Any] | None) -> dict[str, Any] | None:
    """The newest full-retrain run as the dashboard shows it (when, how long, outcome, metrics, gate)."""
    if not run:
        return None
    details = run.get("details") or {}
    gate = details.get("gate") or None
    finished = run.get("finished_at_epoch")
    started = run.get("started_at_epoch")
    return {
        "logical_date": run.get("logical_date"),
        "status": run.get("status"),
        "version": details.get("version") or None,
        "started_at_ms": int(started * 1000) if started is not None else None,
        "finished_at_ms": int(finished * 1000) if finished is not None else None,
        "duration_s": run.get("duration_s"),
        "stage_seconds": details.get("stage_seconds") or {},
        "metrics": _pick_metrics(details.get("metrics")),
        "gate": {"passed": bool(gate.get("passed")), "reason": gate.get("reason", "")} if isinstance(gate, dict) else None,
        "error": details.get("error") or None,
    }


def index_label(index: dict[str, Any] | None) -> str | None:
    """``IVF-PQ (IVF4096,PQ32, nprobe 64)`` from index.json fields, plus ``, exact re-ranking x4``
    when the index has a re-ranking stage; None without an index. Pure."""
    if not index:
        return None
    if not index.get("factory"):
        return index.get("type")
    rerank = f", exact re-ranking x{index['k_factor']}" if index.get("k_factor") else ""
    return f"{index.get('type')} ({index['factory']}, nprobe {index.get('nprobe')}{rerank})"


def derive(raw: dict[str, Any], now_ms: int, cfg: ServingConfig, serving_version: str | None = None) -> dict[str, Any]:
    """The freshness view of one ``gather`` result at wall-clock ``now_ms``. Pure.

    ``serving_version`` is the version this server process has loaded (None: not loaded yet);
    it differs from ``version`` for the moment a new version is loading.
    """
    status = raw.get("status") or {}
    meta = raw.get("meta") or {}
    incr = raw.get("incremental") or {}
    version = status.get("current_version")
    index = meta.get("index") or status.get("index") or {}

    trained_at = meta.get("trained_at")
    trained_ms = int(float(trained_at) * 1000) if trained_at is not None else None
    published_ms = meta.get("published_at_ms")
    model_age = _age_s(now_ms, trained_ms if trained_ms is not None else published_ms)

    last_incr = incr.get("last_publish_at")
    incr_age = _age_s(now_ms, last_incr)
    watermark = incr.get("watermark")
    lag = {str(p): int(v) for p, v in (incr.get("consumer_lag") or {}).items()}

    model_stale = version is None or (model_age is not None and model_age > cfg.model_stale_s)
    since_incr = incr_age if incr_age is not None else _age_s(now_ms, published_ms)
    incremental_stale = version is not None and since_incr is not None and since_incr > cfg.incremental_stale_s
    watermark_lag = _age_s(now_ms, watermark)
    watermark_stale = watermark_lag is not None and watermark_lag > cfg.watermark_stale_s
    archive = raw.get("archive") or {}
    archive_age = _age_s(now_ms, archive.get("checked_at"))
    archive_stale = version is not None and archive_age is not None and archive_age > cfg.incremental_stale_s

    reasons: list[str] = []
    if version is None:
        reasons.append("no model version is published")
    elif model_stale:
        reasons.append(f"model {version} is {human_duration(model_age)} old (limit {human_duration(cfg.model_stale_s)})")
    if incremental_stale:
        what = "no incremental publish since the version was published" if incr_age is None else "last incremental publish"
        reasons.append(f"{what} {human_duration(since_incr)} ago (limit {human_duration(cfg.incremental_stale_s)})")
    if archive_stale:
        reasons.append(
            f"the archiver last landed the stream as raw Parquet {human_duration(archive_age)} ago "
            f"(limit {human_duration(cfg.incremental_stale_s)}): the nightly run would train without the newer events"
        )

    return {
        "now_ms": int(now_ms),
        "version": version,
        "previous_version": status.get("previous_version"),
        "serving_version": serving_version,
        "model_trained_at_ms": trained_ms,
        "published_at_ms": published_ms,
        "data_cutoff_ms": meta.get("data_cutoff_ms"),
        "model_age_s": model_age,
        "model_stale": bool(model_stale),
        "last_full_retrain": retrain_view(raw.get("retrain")),
        "last_incremental_publish_ms": last_incr,
        "incremental_age_s": incr_age,
        "incremental_stale": bool(incremental_stale),
        "incremental_version": incr.get("version") or None,
        "watermark_ms": watermark,
        "watermark_lag_s": watermark_lag,
        "watermark_stale": bool(watermark_stale),
        "last_window_ms": incr.get("last_window"),
        "users_updated_last_hour": incr.get("users_updated") if incr else None,
        "events_applied_last_hour": incr.get("events_applied") if incr else None,
        "consumer_lag": lag,
        "consumer_lag_total": sum(lag.values()) if lag else None,
        "dead_letters": incr.get("dead_letters") if incr else None,
        "archive_checked_ms": archive.get("checked_at"),
        "archive_age_s": archive_age,
        "archive_stale": bool(archive_stale),
        "archive_landed_ms": archive.get("landed_at"),
        "raw_newest_event_ms": archive.get("newest_event_ts"),
        "index_n_items": index.get("n_items") if index else meta.get("n_items"),
        "ann_recall_at_100": index.get("ann_recall_at_100") if index else None,
        "index_type": index_label(index),
        "stale_reasons": reasons,
        "thresholds": {
            "model_stale_s": cfg.model_stale_s,
            "incremental_stale_s": cfg.incremental_stale_s,
            "watermark_stale_s": cfg.watermark_stale_s,
        },
    }


# --- history (I/O) --------------------------------------------------------------------------------


def record_sample(client: redis.Redis, prefix: str, fresh: dict[str, Any], cfg: ServingConfig, force: bool = False) -> bool:
    """Append one sample of each SAMPLED value (those not None) at ``fresh["now_ms"]``.

    At most one sample per ``cfg.sample_interval_s`` across all server processes (unless
    ``force``); samples older than ``cfg.history_hours`` are trimmed. Returns True when written.
    """
    now_ms = int(fresh["now_ms"])
    if not force and not client.set(sample_guard_key(prefix), now_ms, nx=True, px=max(1, int(cfg.sample_interval_s * 1000))):
        return False
    oldest = now_ms - cfg.history_hours * HOUR_MS
    pipe = client.pipeline(transaction=False)
    for metric in SAMPLED:
        value = fresh.get(metric)
        if value is None:
            continue
        key = sample_key(prefix, metric)
        pipe.zadd(key, {f"{now_ms}:{float(value):.3f}": now_ms})
        pipe.zremrangebyscore(key, "-inf", f"({oldest}")
    pipe.execute()
    return True


def read_samples(client: redis.Redis, prefix: str, from_ms: int, to_ms: int) -> dict[str, list[list[float]]]:
    """{metric: [[ms, value], ...] oldest first} for every SAMPLED metric within [from_ms, to_ms]."""
    pipe = client.pipeline(transaction=False)
    for metric in SAMPLED:
        pipe.zrangebyscore(sample_key(prefix, metric), from_ms, to_ms)
    out: dict[str, list[list[float]]] = {}
    for metric, members in zip(SAMPLED, pipe.execute()):
        points = []
        for m in members:
            ms, _, value = (m.decode() if isinstance(m, bytes) else m).partition(":")
            points.append([int(ms), float(value)])
        out[metric] = points
    return out


def hour_slots(last_hour_ms: int, hours: int) -> list[int]:
    """``hours`` hour starts ending with ``last_hour_ms`` (floored to the hour), oldest first. Pure."""
    last = last_hour_ms - last_hour_ms % HOUR_MS
    return [last - (hours - 1 - i) * HOUR_MS for i in range(hours)]


def hourly_counts(client: redis.Redis, prefix: str, version: str | None, hours: list[int]) -> tuple[list[int], list[int]]:
    """(users_updated, events_applied) per hour slot of ``version`` (0 for hours never applied).

    The incremental consumer counts per event-time hour and version (streaming.state).
    """
    if not version:
        return [0] * len(hours), [0] * len(hours)
    from streaming.state import StreamState

    state = StreamState(client, prefix)
    users, events = [], []
    for hour in hours:
        counts = state.window_counts(version, hour)
        users.append(int(counts.get("users", 0)))
        events.append(int(counts.get("events", 0)))
    return users, events


def history(client: redis.Redis, prefix: str, fresh: dict[str, Any], cfg: ServingConfig) -> dict[str, Any]:
    """The dashboard's chart data: per-hour counters over the ``cfg.history_hours`` event-time
    hours ending at the consumer's last applied hour (or the current wall-clock hour when it
    never ran), and the freshness samples of the same number of wall-clock hours."""
    now_ms = int(fresh["now_ms"])
    last = fresh.get("last_window_ms")
    slots = hour_slots(int(last) if last is not None else now_ms, cfg.history_hours)
    version = fresh.get("incremental_version") or fresh.get("version")
    users, events = hourly_counts(client, prefix, version, slots)
    from_ms = now_ms - cfg.history_hours * HOUR_MS
    return {
        "now_ms": now_ms,
        "from_ms": from_ms,
        "version": version,
        "hours": slots,
        "hour_basis": "event time (hours the incremental consumer applied)" if last is not None else "wall clock (no hour applied yet)",
        "users_updated": users,
        "events_applied": events,
        "samples": read_samples(client, prefix, from_ms, now_ms),
    }

"""Run records: one JSON line per job run in the Redis list ``<prefix>:runs``, newest first.

The status command and the dashboards read them to say when each kind of work last finished,
how long it took and how it ended. Kinds in use: ``full_retrain`` (nightly), ``backfill``,
``incremental`` (hourly consumer). A record:

    {"kind", "logical_date", "started_at" (ISO UTC), "started_at_epoch" (s), "finished_at",
     "finished_at_epoch", "duration_s", "status", "details": {...}}

Recording is best effort: a run that did its work is not turned into a failure because Redis
refused the record (the failure to record is logged as an error instead).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from typing import Any

import redis

from twotower import redis_keys
from twotower.config import Settings

log = logging.getLogger(__name__)

MAX_RUNS = 500
"""Records kept in the list; older ones are trimmed on every append."""


def iso_utc(epoch_s: float) -> str:
    """``2024-01-31T02:00:00.123Z`` for epoch seconds."""
    return dt.datetime.fromtimestamp(epoch_s, tz=dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def run_record(
    kind: str, logical_date: str, started_at: float, finished_at: float, status: str, details: dict[str, Any]
) -> dict[str, Any]:
    """The JSON record of one run (epoch seconds in, ISO and epoch out). Pure."""
    return {
        "kind": kind,
        "logical_date": logical_date,
        "started_at": iso_utc(started_at),
        "started_at_epoch": round(float(started_at), 3),
        "finished_at": iso_utc(finished_at),
        "finished_at_epoch": round(float(finished_at), 3),
        "duration_s": round(float(finished_at) - float(started_at), 3),
        "status": status,
        "details": details or {},
    }


def record_run(
    settings: Settings,
    kind: str,
    logical_date: str,
    started_at: float,
    finished_at: float,
    status: str,
    details: dict[str, Any] | None = None,
    client: redis.Redis | None = None,
) -> dict[str, Any] | None:
    """Append a run record (newest first, list capped at MAX_RUNS); returns it, or None when
    Redis could not be written (logged, not raised)."""
    from jobs.redis_conn import redis_client

    record = run_record(kind, logical_date, started_at, finished_at, status, details or {})
    payload = json.dumps(record, sort_keys=True, default=str)
    key = redis_keys.runs(settings.redis.prefix)
    own = client is None
    try:
        client = client or redis_client(settings)
        pipe = client.pipeline(transaction=True)
        pipe.lpush(key, payload)
        pipe.ltrim(key, 0, MAX_RUNS - 1)
        pipe.execute()
    except (redis.RedisError, ConnectionError) as exc:
        log.error("could not record the %s run of %s (status %s) in Redis: %s", kind, logical_date, status, exc)
        return None
    finally:
        if own and client is not None:
            client.close()
    log.info("recorded %s run of %s: %s in %.1f s", kind, logical_date, status, record["duration_s"])
    return record


def recent_runs(
    settings: Settings, kind: str | None = None, n: int = 20, client: redis.Redis | None = None
) -> list[dict[str, Any]]:
    """Up to ``n`` newest records, of one ``kind`` or of all kinds (None)."""
    from jobs.redis_conn import redis_client

    own = client is None
    client = client or redis_client(settings)
    try:
        out: list[dict[str, Any]] = []
        for raw in client.lrange(redis_keys.runs(settings.redis.prefix), 0, MAX_RUNS - 1):
            try:
                record = json.loads(raw)
            except ValueError:
                continue  # a foreign or damaged entry must not break the status page
            if kind is None or record.get("kind") == kind:
                out.append(record)
                if len(out) >= n:
                    break
        return out
    finally:
        if own:
            client.close()


def latest_run(settings: Settings, kind: str, client: redis.Redis | None = None) -> dict[str, Any] | None:
    """The newest record of ``kind``, or None."""
    runs = recent_runs(settings, kind, 1, client)
    return runs[0] if runs else None

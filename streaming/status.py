"""Freshness of the hourly path for ``make status`` and the dashboards (reads Redis only)."""

from __future__ import annotations

import json
from typing import Any

from twotower import redis_keys
from twotower.config import Settings


def archive_record(client, prefix: str) -> dict[str, Any] | None:
    """The archiver's record in Redis (streaming.archiver.archive_status: epoch ms), or None when
    it never ran for this prefix. The one reader of ``<prefix>:archive``."""
    raw = client.get(redis_keys.archive(prefix))
    return json.loads(raw) if raw else None


def incremental_status(settings: Settings, client=None) -> dict[str, Any] | None:
    """The incremental consumer's last known state, or None when it never ran for this prefix.

    Keys: ``version`` (the model version whose rows it updates), ``last_publish_at`` (epoch ms
    of the last hour written, wall clock), ``watermark`` (epoch ms, event time), ``last_window``
    (start of the last applied hour), ``users_updated`` and ``events_applied`` (of that hour),
    ``consumer_lag`` ({partition: records behind the log end}), ``dead_letters`` (total),
    ``updated_at`` (epoch ms of the consumer's last checkpoint).
    """
    from streaming.state import StreamState

    own = client is None
    if own:
        from jobs.redis_conn import redis_client

        client = redis_client(settings)
    try:
        state = StreamState(client, settings.redis.prefix)
        raw = {k.decode(): v.decode() for k, v in client.hgetall(state.key("status")).items()}
        if not raw:
            return None
        version = raw.get("version", "")
        last_window = int(raw["last_window"]) if "last_window" in raw else None
        counts = state.window_counts(version, last_window) if last_window is not None else {}
        lag = {int(k): int(v) for k, v in client.hgetall(state.key("lag")).items()}
        dead = sum(int(v) for v in client.hgetall(state.key("dead")).values())
        return {
            "version": version,
            "last_publish_at": int(raw["last_publish_at"]) if "last_publish_at" in raw else None,
            "watermark": int(raw["watermark"]) if "watermark" in raw else None,
            "last_window": last_window,
            "users_updated": counts.get("users", 0),
            "events_applied": counts.get("events", 0),
            "consumer_lag": dict(sorted(lag.items())),
            "dead_letters": dead,
            "updated_at": int(raw["updated_at"]) if "updated_at" in raw else None,
        }
    finally:
        if own:
            client.close()

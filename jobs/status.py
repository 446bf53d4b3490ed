"""The status report (`make status` prints it as its last line): what serves now and how fresh it is.

    {
      "current_version": "20240131-1a2b3c4d" | null,
      "previous_version": ... | null,
      "switched_at": ISO | null,
      "full_retrain": {"finished_at", "duration_s", "data_cutoff", "status", "logical_date", "version"} | null,
      "metrics": {"hit@10", "hit@50", "hit@100", "ndcg@10", "ann": {same keys} | null} | null,
      "index": {"type", "nlist", "m", "nbits", "nprobe", "ann_recall_at_100", "n_items", "fallback"} | null,
      "incremental": {...} | null,
      "archive": {"checked_at", "landed_at", "newest_event", "events_written", "duplicates_skipped", "invalid", "status"} | null,
      "note": "..."            (only when nothing is published yet)
    }

Every value comes from Redis (pointer, version metadata, run records); the artifact directory
is only read for a retrain whose version never reached Redis (a gated or failed run).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import redis

from jobs.runs import iso_utc, latest_run
from streaming.status import archive_record, incremental_status
from twotower import redis_keys
from twotower.config import Settings
from twotower.contracts import ARTIFACT_FILES

METRIC_KEYS = ("hit@10", "hit@50", "hit@100", "ndcg@10")
INDEX_KEYS = ("type", "nlist", "m", "nbits", "nprobe", "k_factor", "ann_recall_at_100", "n_items", "fallback")


def _ms_iso(ms: Any) -> str | None:
    return iso_utc(int(ms) / 1000) if ms not in (None, "", -1, "-1") else None


def pick_metrics(metrics: dict[str, Any] | None) -> dict[str, Any] | None:
    """The status view of metrics.json: exact hit@10/50/100 and ndcg@10, and the same through the index. Pure."""
    if not metrics:
        return None
    exact = metrics.get("exact", metrics)
    ann = metrics.get("ann")
    out: dict[str, Any] = {k: exact.get(k) for k in METRIC_KEYS}
    out["ann"] = {k: ann.get(k) for k in METRIC_KEYS} if isinstance(ann, dict) else None
    return out


def pick_index(index: dict[str, Any] | None) -> dict[str, Any] | None:
    """The status view of index.json. Pure."""
    return {k: index.get(k) for k in INDEX_KEYS} if index else None


def _version_meta(client: redis.Redis, prefix: str, version: str | None) -> dict[str, Any] | None:
    if not version:
        return None
    raw = client.get(redis_keys.version_meta(prefix, version))
    return json.loads(raw) if raw else None


def full_retrain_view(run: dict[str, Any] | None, meta_of: Any) -> dict[str, Any] | None:
    """The latest full-retrain run: when it finished, how long it took, its data cutoff."""
    if run is None:
        return None
    details = run.get("details") or {}
    version = details.get("version") or None
    cutoff = None
    meta = meta_of(version)
    if meta:
        cutoff = meta.get("data_cutoff")
    elif details.get("artifact_dir"):
        manifest = Path(details["artifact_dir"]) / ARTIFACT_FILES["manifest"]
        if manifest.exists():
            cutoff = _ms_iso(json.loads(manifest.read_text()).get("data_cutoff_ms"))
    return {
        "finished_at": run.get("finished_at"),
        "duration_s": run.get("duration_s"),
        "data_cutoff": cutoff,
        "status": run.get("status"),
        "logical_date": run.get("logical_date"),
        "version": version,
    }


def archive_view(rec: dict[str, Any] | None) -> dict[str, Any] | None:
    """The archiver's last recorded landing (streaming.status.archive_record) with ISO times:
    when it last read the topic (``checked_at``), last landed events (``landed_at``) and how far
    in event time raw Parquet reaches (``newest_event``). None when it never ran. Pure."""
    if rec is None:
        return None
    return {
        "checked_at": _ms_iso(rec.get("checked_at")),
        "landed_at": _ms_iso(rec.get("landed_at")),
        "newest_event": _ms_iso(rec.get("newest_event_ts")),
        **{k: rec.get(k) for k in ("events_written", "duplicates_skipped", "invalid", "status")},
    }


def status_json(settings: Settings, client: redis.Redis | None = None) -> dict[str, Any]:
    """The status report as a JSON-ready dict (valid also when nothing is published)."""
    return status_with_records(settings, client)[0]


def status_with_records(settings: Settings, client: redis.Redis | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(status_json's report, the records it was built from as stored: {"meta": the current
    version's metadata, "retrain": the newest full_retrain run, "incremental":
    streaming.status.incremental_status, "archive": streaming.status.archive_record}, each None
    when absent). serving.freshness needs those raw (epoch ms), and reads Redis once for both."""
    from jobs.redis_conn import redis_client

    prefix = settings.redis.prefix
    own = client is None
    client = client or redis_client(settings)
    try:
        pointer = {k.decode(): v.decode() for k, v in client.hgetall(redis_keys.pointer(prefix)).items()}
        current = pointer.get("current") or None
        meta = _version_meta(client, prefix, current)
        run = latest_run(settings, "full_retrain", client=client)
        records = {"meta": meta, "retrain": run, "incremental": incremental_status(settings, client), "archive": archive_record(client, prefix)}
        out: dict[str, Any] = {
            "current_version": current,
            "previous_version": pointer.get("previous") or None,
            "switched_at": _ms_iso(pointer.get("switched_at_ms")),
            "full_retrain": full_retrain_view(run, lambda v: meta if v == current else _version_meta(client, prefix, v)),
            "metrics": pick_metrics((meta or {}).get("metrics")),
            "index": pick_index((meta or {}).get("index")),
            "incremental": records["incremental"],
            "archive": archive_view(records["archive"]),
        }
    finally:
        if own:
            client.close()
    if current is None:
        out["note"] = "no model version is published yet: run `make run` (or the nightly DAG) to train and publish one"
    elif meta is None:
        out["note"] = f"the pointer names {current} but its metadata is missing from Redis"
    return out, records

"""Run records and the status report, against the real Redis."""

from __future__ import annotations

import json

import pytest

from jobs.publish import publish_version
from jobs.runs import MAX_RUNS, latest_run, recent_runs, record_run
from jobs.status import status_json
from tests.publish_fixtures import tiny_settings, tiny_version
from twotower import redis_keys
from twotower.config import Settings

STATUS_FIELDS = {"current_version", "previous_version", "switched_at", "full_retrain", "metrics", "index", "incremental", "archive"}


def test_record_run_appends_newest_first(settings: Settings, redis_client):
    first = record_run(settings, "full_retrain", "2024-01-30", 1_706_666_400.0, 1_706_666_523.25, "published",
                       {"version": "v1"}, client=redis_client)  # fmt: skip
    assert first == {
        "kind": "full_retrain",
        "logical_date": "2024-01-30",
        "started_at": "2024-01-31T02:00:00.000Z",
        "started_at_epoch": 1_706_666_400.0,
        "finished_at": "2024-01-31T02:02:03.250Z",
        "finished_at_epoch": 1_706_666_523.25,
        "duration_s": 123.25,
        "status": "published",
        "details": {"version": "v1"},
    }
    record_run(settings, "incremental", "2024-01-31", 1_706_670_000.0, 1_706_670_010.0, "ok", {}, client=redis_client)
    record_run(settings, "full_retrain", "2024-01-31", 1_706_752_800.0, 1_706_752_900.0, "failed", {"error": "boom"}, client=redis_client)
    assert latest_run(settings, "full_retrain", client=redis_client)["logical_date"] == "2024-01-31"
    assert latest_run(settings, "incremental", client=redis_client)["status"] == "ok"
    assert latest_run(settings, "backfill", client=redis_client) is None
    assert [r["logical_date"] for r in recent_runs(settings, "full_retrain", 5, client=redis_client)] == ["2024-01-31", "2024-01-30"]
    assert [r["kind"] for r in recent_runs(settings, None, 2, client=redis_client)] == ["full_retrain", "incremental"]


def test_run_list_is_capped(settings: Settings, redis_client):
    for i in range(MAX_RUNS + 5):
        record_run(settings, "incremental", "2024-01-31", float(i), float(i) + 1, "ok", {"i": i}, client=redis_client)
    key = redis_keys.runs(settings.redis.prefix)
    assert redis_client.llen(key) == MAX_RUNS
    assert json.loads(redis_client.lindex(key, 0))["details"]["i"] == MAX_RUNS + 4
    assert json.loads(redis_client.lindex(key, -1))["details"]["i"] == 5


def test_record_run_does_not_raise_when_redis_is_down(settings: Settings):
    down = settings.replace("redis", url="redis://127.0.0.1:1/0", retries=0, socket_timeout_s=0.5)
    assert record_run(down, "full_retrain", "2024-01-30", 0.0, 1.0, "published", {}) is None


def test_status_when_nothing_is_published_is_valid_json(settings: Settings, redis_client):
    out = status_json(settings, client=redis_client)
    assert STATUS_FIELDS <= out.keys()
    assert out["current_version"] is None and out["full_retrain"] is None and out["metrics"] is None
    assert out["index"] is None and out["incremental"] is None and out["archive"] is None
    assert "no model version is published yet" in out["note"]
    json.loads(json.dumps(out))


def test_status_after_a_published_nightly_run(settings: Settings, redis_client):
    s = tiny_settings(settings)
    artifact, _ = tiny_version(s)
    publish_version(s, artifact, client=redis_client)
    record_run(s, "full_retrain", "2024-01-30", 1_706_666_400.0, 1_706_666_460.5, "published",
               {"version": artifact.name, "artifact_dir": str(artifact)}, client=redis_client)  # fmt: skip
    out = status_json(s, client=redis_client)
    metrics = json.loads((artifact / "metrics.json").read_text())
    index = json.loads((artifact / "index.json").read_text())
    assert out["current_version"] == artifact.name and out["previous_version"] is None
    assert out["full_retrain"] == {
        "finished_at": "2024-01-31T02:01:00.500Z",
        "duration_s": 60.5,
        "data_cutoff": "2024-01-31T00:00:00.000Z",
        "status": "published",
        "logical_date": "2024-01-30",
        "version": artifact.name,
    }
    assert out["metrics"] == {
        **{k: metrics["exact"][k] for k in ("hit@10", "hit@50", "hit@100", "ndcg@10")},
        "ann": {k: metrics["ann"][k] for k in ("hit@10", "hit@50", "hit@100", "ndcg@10")},
    }
    assert out["index"] == {k: index.get(k) for k in ("type", "nlist", "m", "nbits", "nprobe", "k_factor", "ann_recall_at_100", "n_items", "fallback")}
    assert out["incremental"] is None and "note" not in out
    json.loads(json.dumps(out))


def test_incremental_section_reports_consumer_state(settings: Settings, redis_client):
    from streaming.state import StreamState

    state = StreamState(redis_client, settings.redis.prefix)
    hour = 1_706_670_000_000 - 1_706_670_000_000 % 3_600_000
    state.record_window("v1", hour, {0: {"users": 3, "events": 7}, 1: {"users": 2, "events": 4}})
    state.set_status("v1", watermark_ms=hour + 4_000_000, last_window=hour, published_at_ms=1_706_700_000_000, now_ms=1_706_700_001_000)
    state.set_lag({0: 5, 1: 0})
    inc = status_json(settings, client=redis_client)["incremental"]
    assert inc["version"] == "v1" and inc["last_window"] == hour and inc["watermark"] == hour + 4_000_000
    assert inc["users_updated"] == 5 and inc["events_applied"] == 11
    assert inc["consumer_lag"] == {0: 5, 1: 0} and inc["last_publish_at"] == 1_706_700_000_000


def test_archive_section_keeps_the_last_landing_when_a_run_finds_nothing_new(settings: Settings, redis_client):
    from streaming.archiver import ArchiveReport, archive_status

    key = redis_keys.archive(settings.redis.prefix)
    first = archive_status(None, ArchiveReport(events_written=12, duplicates_skipped=3), 1_706_670_123_000, 1_706_700_000_000)
    redis_client.set(key, json.dumps(first))
    # an hour later: nothing new on the topic; the landing and how far raw reaches stay as they were
    quiet = archive_status(first, ArchiveReport(), None, 1_706_703_600_000)
    redis_client.set(key, json.dumps(quiet))
    assert status_json(settings, client=redis_client)["archive"] == {
        "checked_at": "2024-01-31T12:20:00.000Z",
        "landed_at": "2024-01-31T11:20:00.000Z",
        "newest_event": "2024-01-31T03:02:03.000Z",
        "events_written": 0,
        "duplicates_skipped": 0,
        "invalid": 0,
        "status": "ok",
    }
    # an older event landed later (a late one) does not move how far raw reaches back
    late = archive_status(quiet, ArchiveReport(events_written=1), 1_706_600_000_000, 1_706_707_200_000)
    assert late["newest_event_ts"] == 1_706_670_123_000 and late["landed_at"] == 1_706_707_200_000


@pytest.mark.parametrize("url", ["http://localhost:6379", "localhost:6379"])
def test_bad_redis_url_is_a_clear_error(settings: Settings, url):
    from jobs.redis_conn import client_options

    with pytest.raises(ValueError, match="redis:// or rediss://"):
        client_options(settings.redis.__class__(url=url))

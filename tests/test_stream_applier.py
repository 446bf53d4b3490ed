"""The applier runs the batches handed to it in order, and refuses the ones queued behind a
batch that failed (the consumer queues the next batch while one is written; streaming.applier)."""

from __future__ import annotations

import threading

import pytest

from streaming.applier import InOrder, ThreadApplier


def test_in_order_refuses_everything_after_a_failure():
    order, ran = InOrder(), []
    assert order.run(lambda: ran.append(1) or "first") == "first"
    with pytest.raises(ConnectionError):
        order.run(lambda: (_ for _ in ()).throw(ConnectionError("redis went away")))
    with pytest.raises(RuntimeError, match="an earlier batch of hours failed .ConnectionError: redis went away"):
        order.run(lambda: ran.append(3))
    assert ran == [1]


def test_a_thread_applier_does_not_apply_the_batch_queued_behind_a_failed_one(settings, monkeypatch):
    import streaming.applier as applier

    release, applied = threading.Event(), []

    def fake_apply(state, version, hours, cfg, cache):
        release.wait(10)
        if hours == "bad":
            raise ValueError("the first batch broke")
        applied.append(hours)
        return []

    monkeypatch.setattr(applier, "apply_hours", fake_apply)
    version = type("V", (), {"version": "v1"})()
    kind = ThreadApplier(state=None, cfg=settings.incremental)
    try:
        first = kind.submit(version, "bad")
        second = kind.submit(version, "good")  # queued while the first is still running
        release.set()
        with pytest.raises(ValueError, match="broke"):
            first.result(10)
        with pytest.raises(RuntimeError, match="earlier batch of hours failed"):
            second.result(10)
        assert applied == []
    finally:
        kind.close()


def test_hour_counters_of_a_batch_land_as_one_hour_at_a_time(settings, redis_client):
    """record_windows (one script call for a batch) leaves what record_window per hour leaves:
    per-partition counters with their expiry, and the version's hour set."""
    from streaming.state import WINDOW_STATS_TTL_S, StreamState

    hours = [(3_600_000 * h, {p: {"users": h + p, "events": 2 * h + p} for p in range(h % 3)}) for h in range(1, 700)]
    one, batch = StreamState(redis_client, settings.redis.prefix + "-one"), StreamState(redis_client, settings.redis.prefix + "-batch")
    try:
        for hour, counts in hours:
            one.record_window("v1", hour, counts)
        batch.record_windows("v1", hours)
        newest = hours[-1][0]
        kept = [h for h, _ in hours if h >= newest - WINDOW_STATS_TTL_S * 1000]  # the set keeps the TTL's span
        assert len(kept) < len(hours)
        for state in (one, batch):
            assert state.applied_windows("v1") == kept
            assert state.window_counts("v1", 3_600_000 * 5) == {"users": 11, "events": 21}
            assert state.window_counts("v1", 3_600_000 * 3) == {}  # no partition had events
            assert 0 < redis_client.ttl(state.key(f"win:v1:{3_600_000 * 5}")) <= WINDOW_STATS_TTL_S
        assert redis_client.hgetall(one.key(f"win:v1:{3_600_000 * 698}")) == redis_client.hgetall(batch.key(f"win:v1:{3_600_000 * 698}"))
    finally:
        for prefix in (settings.redis.prefix + "-one", settings.redis.prefix + "-batch"):
            for key in redis_client.scan_iter(match=f"{prefix}:*"):
                redis_client.unlink(key)


def test_the_wire_carries_a_batch_of_hours_unchanged():
    """encode_hours -> JSON -> decode_hours gives back every event and its partition, whatever
    the ids hold (quotes, backslashes, non-ASCII; never control characters: they are refused
    upstream), and an empty hour; a frame whose columns disagree is an error."""
    import json

    from streaming.applier import decode_hours, encode_hours
    from streaming.events import Event
    from streaming.windows import Buffered

    def buffered(p, *event):
        return Buffered(p, 7, Event(*event), 1, 2, 3)

    hours = [
        (3_600_000, [buffered(0, "e1", 'u"1\\', "i1", "click", 3_600_001, 1.0), buffered(3, "é2", "ü", "i 2", "a:b", 3_600_002, 0.5)]),
        (7_200_000, []),
        (10_800_000, [buffered(1, "e3", "u3", "{x}", "view", 10_800_000, 2.0)]),
    ]
    back = decode_hours(json.loads(json.dumps(encode_hours(hours))))
    assert [(h, [(b.partition, b.event) for b in events]) for h, events in back] == [(h, [(b.partition, b.event) for b in events]) for h, events in hours]
    wire = encode_hours(hours)
    wire[0][2] += "\textra"
    with pytest.raises(ValueError, match="malformed batch"):
        decode_hours(wire)

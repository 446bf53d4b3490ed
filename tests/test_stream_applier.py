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


class _FakeShard:
    """A worker that records what it was handed and answers with one HourResult per hour
    (counts: its events), or fails."""

    def __init__(self, fail: bool = False):
        self.fail, self.got, self.forgot = fail, [], []

    def submit(self, version, hours):
        from concurrent.futures import Future

        from streaming.hour import HourResult

        self.got.append(hours)
        future: Future = Future()
        if self.fail:
            future.set_exception(ConnectionError("redis went away"))
        else:
            results = []
            for hour, buffered in hours:
                parts = {b.partition for b in buffered}
                results.append(HourResult(hour, events_in_hour=len(buffered), users_updated=1, compute_s=0.1 * len(buffered), per_partition={p: {"events": 1} for p in parts}))
            future.set_result(results)
        return future

    def forget_users(self, why):
        self.forgot.append(why)

    def cache_stats(self):
        return {"hits": 2, "size": 3}

    def close(self):
        pass


def _buffered(partition: int, hour: int, n: int):
    from streaming.events import Event
    from streaming.windows import Buffered

    return [Buffered(partition, i, Event(f"e{hour}-{partition}-{i}", f"u{partition}", "i1", "view", hour + i, 1.0), 0, 0, 0) for i in range(n)]


def test_a_sharded_applier_gives_each_worker_its_partitions_and_sums_the_hours():
    from streaming.applier import ShardedApplier

    shards = [_FakeShard(), _FakeShard()]
    applier = ShardedApplier(shards)
    # hour 10: partitions 0, 1, 3; hour 20: partition 2 only (worker 1 gets nothing of it)
    hours = [(10, _buffered(0, 10, 2) + _buffered(1, 10, 1) + _buffered(3, 10, 3)), (20, _buffered(2, 20, 4))]
    results = applier.submit(None, hours).result(5)
    assert [[(h, sorted({b.partition for b in bs})) for h, bs in got] for got in shards[0].got] == [[(10, [0]), (20, [2])]]
    assert [[(h, sorted({b.partition for b in bs})) for h, bs in got] for got in shards[1].got] == [[(10, [1, 3])]]
    assert [r.hour_ms for r in results] == [10, 20]
    assert [r.events_in_hour for r in results] == [6, 4] and [r.users_updated for r in results] == [2, 1]
    assert results[0].per_partition == {0: {"events": 1}, 1: {"events": 1}, 3: {"events": 1}}
    assert results[0].compute_s == pytest.approx(0.4)  # the slower worker's time, not the sum
    applier.forget_users("version switch")
    assert [s.forgot for s in shards] == [["version switch"]] * 2
    assert applier.cache_stats() == {"hits": 4, "size": 6}


def test_a_sharded_applier_fails_the_batch_when_one_worker_fails():
    from streaming.applier import ShardedApplier

    applier = ShardedApplier([_FakeShard(), _FakeShard(fail=True)])
    with pytest.raises(ConnectionError, match="redis went away"):
        applier.submit(None, [(10, _buffered(0, 10, 1) + _buffered(1, 10, 1))]).result(5)


def test_applier_workers_need_the_process_applier(settings):
    from streaming.applier import make_applier

    with pytest.raises(ValueError, match="applier_workers must be 1, or more with applier 'process'"):
        make_applier(settings.replace("incremental", applier="thread", applier_workers=2), None, None)
    with pytest.raises(ValueError, match="applier_workers must be 1"):
        make_applier(settings.replace("incremental", applier="process", applier_workers=0), None, None)


def test_a_sharded_batch_completes_once_when_its_workers_finish_at_the_same_time():
    """The workers' futures complete on their own I/O threads, possibly at once: the merged
    batch is set exactly once, never left pending."""
    from concurrent.futures import Future

    from streaming.applier import _merged
    from streaming.hour import HourResult

    for _ in range(200):
        futures = [Future() for _ in range(4)]
        merged = _merged(futures, [10])
        start = threading.Barrier(4)

        def finish(f: Future) -> None:
            start.wait()
            f.set_result([HourResult(10, users_updated=1)])

        threads = [threading.Thread(target=finish, args=(f,)) for f in futures]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [r.users_updated for r in merged.result(1)] == [4]

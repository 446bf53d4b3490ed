"""A batch of hours written with one read and two write round trips (streaming.batch) leaves Redis
exactly as the same hours applied one at a time from Redis (streaming.hour), including when a
prediction fails and when the batch is a replay; on the real model and the real Redis."""

from __future__ import annotations

import logging
import random

import pytest

from streaming.batch import apply_batch
from streaming.events import Event
from streaming.hour import apply_hour
from streaming.state import NO_GUARD, Guard, StreamState, UserWrite
from streaming.user_cache import UserCache
from tests.kafka_fixtures import HOUR
from twotower import redis_keys as rk
from tests.test_stream_update import H0, buffered, ev, snapshot, version  # noqa: F401 - version is a fixture

MIN_EVENTS = 2


def random_hours(n_hours: int, seed: int, users_per_hour: list[int] | None = None) -> list[list[Event]]:
    """Known users u1..u24 and new users n1..n6 (cold start after MIN_EVENTS), known items and a
    few unknown ones, one to five events per active user-hour, weights 0 to 3; 8 users an hour
    unless ``users_per_hour`` says otherwise."""
    rng = random.Random(seed)
    hours, k = [], 0
    pool = [f"u{i}" for i in range(1, 25)] + [f"n{i}" for i in range(1, 7)]
    for h in range(n_hours):
        events = []
        for user in rng.sample(pool[:12] + pool[24:] if users_per_hour is None else pool, 8 if users_per_hour is None else users_per_hour[h]):
            for _ in range(rng.randint(1, 5)):
                k += 1
                item = f"i{rng.randint(1, 30)}" if rng.random() > 0.1 else f"x{rng.randint(1, 3)}"
                events.append(Event(f"e{k}", user, item, "click", H0 + h * HOUR + rng.randint(0, HOUR - 1), float(rng.randint(0, 3))))
        hours.append(events)
    return hours


def copy_prefix(redis_client, src: str, dst: str) -> None:
    for key in redis_client.scan_iter(match=f"{src}:*"):
        redis_client.copy(key, dst + key.decode()[len(src):])


def drop(redis_client, prefix: str) -> None:
    for key in redis_client.scan_iter(match=f"{prefix}:*"):
        redis_client.unlink(key)


def settings_for_batch(settings):
    return settings.replace("incremental", min_events_new_user=MIN_EVENTS)


@pytest.mark.parametrize(
    "users_per_hour",
    [None, [20, 3, 25, 1, 2, 18, 30, 1, 4]],  # small hours only (a block per user), and small between large (streaming.update.block_size)
)
def test_a_batch_writes_what_one_hour_at_a_time_writes(settings, redis_client, version, users_per_hour):
    s = settings_for_batch(settings)
    hours = random_hours(9, seed=3, users_per_hour=users_per_hour)
    plain = s.redis.prefix + "-plain"
    copy_prefix(redis_client, s.redis.prefix, plain)
    try:
        batched, one_by_one = StreamState(redis_client, s.redis.prefix), StreamState(redis_client, plain)
        cache = UserCache("v1", 1000)
        results = []
        for part in (range(0, 6), range(6, 9)):  # the second batch starts from the cache the first left
            results += apply_batch(batched, version, [(H0 + h * HOUR, buffered(hours[h])) for h in part], s.incremental, cache)
        expected = [apply_hour(one_by_one, version, H0 + h * HOUR, buffered(hours[h]), s.incremental) for h in range(9)]
        counts = lambda r: (r.hour_ms, r.users_updated, r.new_users, r.rows_written, r.events_applied, r.unknown_items, r.history_only, r.per_partition)  # noqa: E731
        assert [counts(r) for r in results] == [counts(r) for r in expected]
        assert sum(r.new_users for r in results) > 0 and sum(r.history_only for r in results) > 0
        assert cache.hits > 0 and len(cache) > 0
        assert snapshot(redis_client, s.redis.prefix) == snapshot(redis_client, plain)  # byte for byte

        # the same batch again (a restart after a crash): recognised as a replay, nothing written
        again = apply_batch(batched, version, [(H0 + h * HOUR, buffered(hours[h])) for h in range(6, 9)], s.incremental, UserCache("v1", 10))
        assert sum(r.rows_written for r in again) == 0
        assert snapshot(redis_client, s.redis.prefix) == snapshot(redis_client, plain)
    finally:
        drop(redis_client, plain)


def test_a_failed_prediction_is_redone_from_redis(settings, redis_client, version, caplog):
    """u1's event e1 comes again in hour 1 (a producer retry with a new timestamp): the history
    keeps its first copy, so the batch's prediction of u1's history for hour 2 is wrong. The
    guard stops u1's hour-2 write and hours 2.. are applied again from Redis: the result is that
    of one hour at a time."""
    s = settings_for_batch(settings)
    hours = [
        [ev(1, "u1", "i3", H0 + 1), ev(2, "u2", "i4", H0 + 2)],
        [ev(1, "u1", "i3", H0 + HOUR + 1), ev(3, "u2", "i5", H0 + HOUR + 2)],
        [ev(4, "u1", "i6", H0 + 2 * HOUR + 1), ev(5, "u2", "i7", H0 + 2 * HOUR + 2)],
    ]
    plain = s.redis.prefix + "-plain"
    copy_prefix(redis_client, s.redis.prefix, plain)
    try:
        cache = UserCache("v1", 100)
        with caplog.at_level(logging.WARNING, logger="streaming.consumer"):
            results = apply_batch(StreamState(redis_client, s.redis.prefix), version, [(H0 + h * HOUR, buffered(e)) for h, e in enumerate(hours)],
                                  s.incremental, cache)
        assert "not what the batch predicted" in caplog.text
        expected = [apply_hour(StreamState(redis_client, plain), version, H0 + h * HOUR, buffered(e), s.incremental) for h, e in enumerate(hours)]
        assert [r.users_updated for r in results] == [r.users_updated for r in expected]
        assert [r.rows_written for r in results] == [r.rows_written for r in expected]
        assert snapshot(redis_client, s.redis.prefix) == snapshot(redis_client, plain)
    finally:
        drop(redis_client, plain)


def test_a_guard_that_does_not_hold_writes_nothing(settings, redis_client, version):
    state = StreamState(redis_client, settings.redis.prefix)
    row = version.model_row(1)
    write = UserWrite("u1", row, 1, [(H0 + 5, rk.history_member("e1", "i3"))])
    before = snapshot(redis_client, settings.redis.prefix)
    # the nightly row holds w = -1; a guard expecting an hour-written row, or history events
    # since an hour that has none, is refused whole
    for guard in (Guard(str(H0 - HOUR), "", 0), Guard("*", str(H0 - HOUR), 1)):
        (out,) = state.apply_writes("v1", [(H0, write, guard)], version.history_len, 86_400_000)
        assert out.conflict and not out.applied and not out.exact
    assert snapshot(redis_client, settings.redis.prefix) == before
    (out,) = state.apply_writes("v1", [(H0, write, Guard("-1", str(H0), 0))], version.history_len, 86_400_000)
    assert out.applied and out.exact and not out.conflict
    (out,) = state.apply_writes("v1", [(H0 + HOUR, write._replace(history=[]), NO_GUARD)], version.history_len, 86_400_000)
    assert out.applied and not out.conflict

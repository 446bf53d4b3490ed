"""Apply a batch of closed hours with one Redis read and two write round trips, instead of a read
and writes per hour (DESIGN §5 steps 2-4, for a backlog).

A backlog (a bounded run after an hour or more, a restart, a burst) closes many hours at once,
and per hour the round trips and script calls cost more than the update itself. The hours still
have to be applied one after the other, since a user's hour starts from the row and history
their previous hour left, but that state is known without asking Redis: each write is planned,
so what it leaves is predicted (hour.written_entry, the rule the user cache already relies on).

  1. Read every touched user the cache does not hold, once, each as of their first hour in the
     batch (one pipelined round trip).
  2. Compute the hours in order, each from the predicted state the hours before it leave, with
     the same plans and compute batches as one hour at a time (streaming.hour), so the rows are
     bitwise the same as there.
  3. Write everything in order, in two pipelined round trips (the ``mid_rows`` crash point
     between them). A user's second and later writes carry a guard (state.Guard): the row's ``w``
     the computation assumed, and that the user's previous write added exactly its events to the
     history with nothing else there since. Scripts are atomic per user and run in order, so a
     prediction that did not come true (an event id already in the history from long ago, another
     writer) stops that user's writes at the first one computed from it.
  4. After a conflict, the hours from the first conflicted one on are applied again one at a time
     from Redis (hour.apply_hour): users already written are recognised as replays and not
     written again, which is what a restart after a crash does anyway.

A batch that the read shows to be a replay (a row already records one of its hours, or history
events from the batch's hours on are already stored: a restart after a crash, or a new version
replaying since its cutoff over histories the old version wrote) goes one hour at a time from the
start, where predictions would not hold. So does a single hour: nothing to save there.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from streaming.faults import crash_point
from streaming.hour import HourResult, apply_hour, compute_rows, hour_writes, plan_users, written_entry
from streaming.state import NO_GUARD, Guard, StreamState, UserWrite
from streaming.user_cache import CachedUser, UserCache
from streaming.version import LoadedVersion
from streaming.windows import Buffered, events_by_user
from twotower.config import IncrementalConfig

log = logging.getLogger("streaming.consumer")

Hours = list[tuple[int, list[Buffered]]]


def apply_batch(state: StreamState, version: LoadedVersion, hours: Hours, cfg: IncrementalConfig, cache: UserCache | None) -> list[HourResult]:
    """Apply closed ``hours`` (in order) and return one HourResult each (see module docstring).
    ``cache`` (streaming.user_cache, for this version) is dropped whole on any error."""
    if cache is not None and cache.version != version.version:
        raise ValueError(f"the user cache belongs to version {cache.version}, not {version.version}")
    if len(hours) == 1:
        return [apply_hour(state, version, hours[0][0], hours[0][1], cfg, cache)]
    try:
        return _apply_batch(state, version, hours, cfg, cache)
    except BaseException:
        if cache is not None:
            cache.clear()
        raise


def one_at_a_time(state: StreamState, version: LoadedVersion, hours: Hours, cfg: IncrementalConfig, cache: UserCache | None) -> list[HourResult]:
    return [apply_hour(state, version, hour, buffered, cfg, cache) for hour, buffered in hours]


def _apply_batch(state: StreamState, version: LoadedVersion, hours: Hours, cfg: IncrementalConfig, cache: UserCache | None) -> list[HourResult]:
    t0 = time.perf_counter()
    L = version.history_len
    grouped = []
    first_hour: dict[str, int] = {}
    for hour, buffered in hours:
        by_user = events_by_user(buffered)
        grouped.append((hour, by_user, {b.event.user_id: b.partition for b in buffered}))
        for uid in by_user:
            first_hour.setdefault(uid, hour)

    # 1. the state before each user's first hour: the cache, else one read
    current: dict[str, CachedUser] = {}
    missing = []
    for uid in first_hour:
        entry = cache.get(uid) if cache is not None else None
        if entry is None:
            missing.append(uid)
        else:
            current[uid] = entry
    if missing:
        rows, hists, later = state.read_users(version.version, missing, [first_hour[u] for u in missing], L)
        index = version.item_index
        for uid in missing:
            row = rows.get(uid)
            if later[uid] or (row is not None and row.w >= first_hour[uid]):
                log.info(
                    "%d hours from %s are partly in Redis already (user %s: a replay after a restart or a version "
                    "switch): applying them one at a time", len(hours), _iso(hours[0][0]), uid,
                )
                return one_at_a_time(state, version, hours, cfg, cache)
            current[uid] = CachedUser(row, np.array([index.get(i, 0) for i in hists[uid]], dtype=np.int32))
    read_s = time.perf_counter() - t0

    # 2. the hours in order, each from what the ones before it leave
    results: list[HourResult] = []
    pending: list[tuple[int, UserWrite, Guard, bool]] = []  # hour, write, guard, row planned
    last_write: dict[str, tuple[int, int]] = {}  # user -> (hour, events) of their latest write so far
    for hour, by_user, partition_of in grouped:
        t_hour = time.perf_counter()
        rows_before = {u: current[u].row for u in by_user if current[u].row is not None}
        hists_before = {u: current[u].hist for u in by_user}
        plans = plan_users(hour, by_user, rows_before, hists_before, version, cfg.min_events_new_user)
        new_rows = compute_rows(version, plans, hists_before, cfg)
        result, writes, added = hour_writes(hour, plans, new_rows, partition_of, version.item_index)
        for plan, write, items in zip(plans, writes, added):
            uid = plan.user_id
            before = current[uid]
            prev = last_write.get(uid)
            guard = NO_GUARD if prev is None else Guard(_stored_w(before), str(prev[0]), prev[1])
            pending.append((hour, write, guard, write.row is not None))
            current[uid] = written_entry(plan, write, items, before.row, before.hist, hour, L)
            last_write[uid] = (hour, len(write.history))
        result.compute_s = time.perf_counter() - t_hour
        result.seconds = result.compute_s
        results.append(result)

    # 3. every write in order, guarded by the prediction it was computed from
    t_write = time.perf_counter()
    retention_ms = cfg.history_retention_s * 1000
    triples = [(hour, write, guard) for hour, write, guard, _ in pending]
    half = len(triples) // 2
    outcomes = state.apply_writes(version.version, triples[:half], L, retention_ms) if half else []
    if half:
        crash_point("mid_rows")
    outcomes += state.apply_writes(version.version, triples[half:], L, retention_ms)
    position = {hour: i for i, (hour, _) in enumerate(hours)}
    conflict_at: int | None = None
    vouched: dict[str, bool] = {}
    for (hour, write, _, planned), out in zip(pending, outcomes):
        if out.conflict:
            conflict_at = hour if conflict_at is None else min(conflict_at, hour)
            continue
        results[position[hour]].rows_written += int(out.applied)
        vouched[write.user_id] = out.exact and out.applied == planned
    results[0].read_s = read_s
    results[-1].write_s = time.perf_counter() - t_write

    # 4. a prediction that did not hold: redo from the first hour it touched, from Redis
    if conflict_at is not None:
        if cache is not None:
            cache.clear()
        log.warning(
            "a user's state in Redis was not what the batch predicted from %s on (an event id already in their "
            "history, or another writer): applying those hours again one at a time from Redis", _iso(conflict_at),
        )
        for i, (hour, buffered) in enumerate(hours):
            if hour >= conflict_at:
                written = results[i].rows_written
                results[i] = apply_hour(state, version, hour, buffered, cfg, cache)
                results[i].rows_written += written
        return results
    if cache is not None:
        for uid, ok in vouched.items():
            if ok:
                cache.put(uid, current[uid])
            else:
                cache.drop(uid)
    return results


def _stored_w(entry: CachedUser) -> str:
    """The row's ``w`` as Redis holds it ('' when there is no row)."""
    return "" if entry.row is None else str(entry.row.w)


def _iso(ms: int) -> str:
    from streaming.consumer import iso

    return iso(ms)

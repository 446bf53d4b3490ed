"""Apply a batch of closed hours with one Redis read and a few write round trips, instead of a
read and writes per hour (DESIGN §5 steps 2-4, for a backlog).

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
  3. Write everything in order, in chunks sent from a helper thread while the later hours are
     computed (WriteBehind; the ``mid_rows`` crash point after the first chunk). A user's second
     and later writes carry a guard (state.Guard): the row's ``w`` the computation assumed, and
     that the user's previous write added exactly its events to the history with nothing else
     there since. Scripts are atomic per user and run in order, so a
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
from concurrent.futures import Future, ThreadPoolExecutor

from streaming.faults import crash_point
from streaming.hour import HourResult, apply_hour, hour_writes, plan_users, read_state, row_jobs, written_entry
from streaming.state import NO_GUARD, Guard, StoredRow, StreamState, UserWrite, WriteOutcome
from streaming.user_cache import CachedUser, UserCache
from streaming.update import RowJob, assign_levels, run_levels
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
    """The hours applied one after the other, each read from Redis (and the cache): streaming.hour."""
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
    rows, hists, later = read_state(state, version, first_hour, list(first_hour), cache)
    for uid, hour in first_hour.items():
        row = rows.get(uid)
        if later.get(uid) or (row is not None and row.w >= hour):
            log.info(
                "%d hours from %s are partly in Redis already (user %s: a replay after a restart or a version "
                "switch): applying them one at a time", len(hours), _iso(hours[0][0]), uid,
            )
            return one_at_a_time(state, version, hours, cfg, cache)
    current = {uid: CachedUser(rows.get(uid), hists[uid]) for uid in first_hour}
    read_s = time.perf_counter() - t0

    # 2. the hours planned in order, each from what the ones before it leave (a row not computed
    # yet is the RowJob that will compute it); then every row computed, pass after pass
    # (streaming.update.run_jobs); 3. the writes, each guarded by the prediction it was computed
    # from, sent as soon as their rows are known while later passes compute
    results: list[HourResult] = []
    pending: list[tuple[int, UserWrite, Guard, bool]] = []  # hour, write (row: a RowJob until computed), guard, row planned
    last_write: dict[str, tuple[int, int]] = {}  # user -> (hour, events) of their latest write so far
    jobs_by_hour: list[list[RowJob]] = []
    for hour, by_user, partition_of in grouped:
        t_hour = time.perf_counter()
        rows_before = {u: current[u].row for u in by_user if current[u].row is not None}
        hists_before = {u: current[u].hist for u in by_user}
        plans = plan_users(hour, by_user, rows_before, hists_before, version, cfg.min_events_new_user)
        computed, jobs = row_jobs(plans, hists_before, partition_of)
        jobs_by_hour.append(jobs)
        result, writes = hour_writes(hour, plans, {p.user_id: job for p, job in zip(computed, jobs)}, partition_of)
        for plan, write in zip(plans, writes):
            uid = plan.user_id
            before = current[uid]
            prev = last_write.get(uid)
            guard = NO_GUARD if prev is None else Guard(_stored_w(before), str(prev[0]), prev[1])
            pending.append((hour, write, guard, write.row is not None))
            current[uid] = written_entry(plan, write.row, before.row, before.hist, hour, L)
            last_write[uid] = (hour, len(write.history))
        result.compute_s = time.perf_counter() - t_hour
        result.seconds = result.compute_s
        results.append(result)

    # a user's writes must reach Redis in hour order (each one's guard assumes the one before);
    # different users' writes are independent. So the writes go out pass by pass: each pass's
    # rows as soon as it is computed, a history-only write with the user's write before it
    levels = assign_levels(jobs_by_hour, version.update_arrays, cfg)
    write_level: list[int] = []
    user_level: dict[str, int] = {}
    for _, write, _, _ in pending:
        level = write.row.level if isinstance(write.row, RowJob) else user_level.get(write.user_id, 0)
        user_level[write.user_id] = level
        write_level.append(level)
    order = sorted(range(len(pending)), key=write_level.__getitem__)  # stable: hour order within a pass
    ready: list[tuple[int, UserWrite, Guard]] = []  # the writes of order[:len(ready)], rows computed

    def send_ready(level: int) -> None:
        while len(ready) < len(order) and write_level[order[len(ready)]] <= level:
            hour, write, guard, _ = pending[order[len(ready)]]
            ready.append((hour, _computed(write), guard))
        writer.offer(ready[writer.handed :])

    writer = WriteBehind(state, version.version, L, cfg.history_retention_s * 1000)
    try:
        t_compute = time.perf_counter()
        run_levels(version, levels, cfg, after_level=send_ready)
        results[-1].compute_s += time.perf_counter() - t_compute  # one computation for the batch
        t_write = time.perf_counter()
        send_ready(len(levels))  # nothing is left uncomputed: every write is ready
        sent = writer.finish(ready[writer.handed :])
    finally:
        writer.close()
    outcomes: list[WriteOutcome] = [None] * len(pending)  # type: ignore[list-item]
    for i, out in zip(order, sent):
        outcomes[i] = out
    for uid, entry in current.items():
        if entry.row is not None and isinstance(entry.row.e, RowJob):
            current[uid] = CachedUser(StoredRow(entry.row.e.out, entry.row.w, entry.row.n, entry.row.f), entry.hist)
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
    results[-1].write_s = time.perf_counter() - t_write  # what the writes took beyond the computation

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


class WriteBehind:
    """A batch's writes, sent in order from one helper thread while the hours after them are
    computed: the Redis server's script work (most of a write's cost) overlaps the update's
    arithmetic instead of following it. Whenever the thread is free, the waiting writes are sent
    in a multiple of ``MIN_CHUNK`` (a slow Redis gets fewer, larger chunks; chunk ends fall
    anywhere in an hour). Order is what the
    guards need: one thread, one chunk after the other. A batch too small to have sent anything
    before its end is sent in two halves, so the ``mid_rows`` crash point (after the first
    chunk) always finds part of the writes done and the rest not. After a failed chunk nothing
    more is sent, and the error is raised from ``finish``."""

    MIN_CHUNK = 64

    def __init__(self, state: StreamState, version: str, history_len: int, retention_ms: int):
        self._args = (state, version, history_len, retention_ms)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-writes")
        self._chunks: list[Future] = []
        self._failed = False
        self.handed = 0
        """How many of the batch's writes (in order) were handed over so far."""

    def offer(self, waiting: list[tuple[int, UserWrite, Guard]]) -> None:
        """``waiting``: the writes not handed over yet; sent now when the thread is free."""
        if len(waiting) >= self.MIN_CHUNK and (not self._chunks or self._chunks[-1].done()):
            self._send(waiting[: len(waiting) - len(waiting) % self.MIN_CHUNK])  # whole chunks; the rest waits

    def finish(self, waiting: list[tuple[int, UserWrite, Guard]]) -> list[WriteOutcome]:
        """Send the rest and wait for everything: one WriteOutcome per write, in order."""
        if not self._chunks and len(waiting) > 1:
            half = len(waiting) // 2
            self._send(waiting[:half])
            waiting = waiting[half:]
        if waiting:
            self._send(waiting)
        return [out for chunk in self._chunks for out in chunk.result()]

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def _send(self, writes: list[tuple[int, UserWrite, Guard]]) -> None:
        self.handed += len(writes)
        self._chunks.append(self._pool.submit(self._write, writes, len(self._chunks) == 0))

    def _write(self, writes: list[tuple[int, UserWrite, Guard]], first: bool) -> list[WriteOutcome]:
        if self._failed:
            raise RuntimeError("an earlier chunk of this batch's writes failed")
        state, version, history_len, retention_ms = self._args
        try:
            outcomes = state.apply_writes(version, writes, history_len, retention_ms)
        except BaseException:
            self._failed = True
            raise
        if first:
            crash_point("mid_rows")
        return outcomes


def _computed(write: UserWrite) -> UserWrite:
    """The write with its row computed (UserWrite.row was the RowJob computing it)."""
    if not isinstance(write.row, RowJob):
        return write
    return tuple.__new__(UserWrite, (write.user_id, write.row.out, write.n_events, write.history))  # _replace, without its Python-level cost


def _stored_w(entry: CachedUser) -> str:
    """The row's ``w`` as Redis holds it ('' when there is no row)."""
    return "" if entry.row is None else str(entry.row.w)


def _iso(ms: int) -> str:
    from streaming.consumer import iso

    return iso(ms)

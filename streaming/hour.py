"""Apply one closed event-time hour to the user rows of a model version (DESIGN §5 steps 2-4).

    plan_users (pure)  which touched users get a row update, from which starting row
    apply_hour         read rows + histories -> Adagrad steps (streaming.update) -> atomic writes

Who gets a row this hour (``plan_users``):
  * a user whose row already records this hour (``w >= hour``) is a replay after a crash: it is
    recomputed only to keep the batch shapes of the first pass (see streaming.update) and
    never written (an unknown user whose row was first written by a later hour, field ``f``,
    was history-only at this one, and is again);
  * a user with a row in Redis starts from it; a user of the version's vocabulary without one
    starts from the model's row;
  * an unknown user (cold start) starts from the out-of-vocabulary row 0 once they have
    ``min_events_new_user`` events (history before the hour plus the hour's own); until then
    only their history grows;
  * a user whose events are all on items unknown to the version (or carry weight 0) has no
    positive to learn from: history only.

Every user's history receives the hour's events, admitted or not.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from collections.abc import Mapping, Sized

import numpy as np

from streaming.events import Event
from streaming.faults import crash_point
from streaming.state import StoredRow, StreamState, UserWrite, WriteOutcome
from streaming.user_cache import CachedUser, UserCache, next_history
from streaming.update import NO_HISTORY, RowJob, UserTargets, run_jobs, user_targets
from streaming.version import LoadedVersion
from streaming.windows import HOUR_MS, Buffered, events_by_user, window_start
from twotower import redis_keys as rk
from twotower.config import IncrementalConfig

log = logging.getLogger(__name__)

UPDATE, REPLAYED, HISTORY_ONLY = "update", "replayed", "history_only"


@dataclass(slots=True)
class UserPlan:
    """What the hour does for one user."""

    user_id: str
    events: list[Event]
    """In (ts, event_id, item_id) order (streaming.windows.events_by_user), the history's order."""
    kind: str
    targets: UserTargets | None = None
    start_row: "np.ndarray | RowJob | None" = None
    """The row before the hour, or (streaming.batch) the job computing it from the user's previous hour."""
    user_idx: int = 0
    new_user: bool = False
    n_known: int = 0
    """Events on items the version knows (what the row absorbs)."""
    item_idx: list[int] = field(default_factory=list)
    """Each event's item_idx (0: unknown to the version), in ``events`` order."""


@dataclass
class HourResult:
    """What applying one hour did. Counts are functions of the hour's content (equal after a
    replay); ``rows_written`` is what this attempt wrote."""

    hour_ms: int
    events_in_hour: int = 0
    """Distinct events of the hour (each one lands in its user's history, and in the row's
    update when its item is known and the user is admitted)."""
    users_updated: int = 0
    events_applied: int = 0
    unknown_items: int = 0
    new_users: int = 0
    history_only: int = 0
    rows_written: int = 0
    seconds: float = 0.0
    read_s: float = 0.0
    compute_s: float = 0.0
    write_s: float = 0.0
    per_partition: dict[int, dict[str, int]] = field(default_factory=dict)


def plan_users(
    hour_ms: int,
    by_user: dict[str, list[Event]],
    rows: dict[str, StoredRow],
    hists: Mapping[str, Sized],
    version: LoadedVersion,
    min_events_new_user: int,
) -> list[UserPlan]:
    """Classify each touched user (see module docstring). Pure given its inputs; ``hists`` holds
    each user's history before the hour (only its length matters here)."""
    plans = []
    item_of, user_of = version.item_index.get, version.user_index.get
    for uid, events in by_user.items():
        idx = [item_of(e.item_id, 0) for e in events]
        targets = user_targets(idx, [e.weight for e in events])
        stored = rows.get(uid)
        user_idx = user_of(uid, 0)
        plan = UserPlan(uid, events, HISTORY_ONLY, targets, None, user_idx, False, len(idx) - idx.count(0), idx)
        if targets is None:
            plans.append(plan)
            continue
        if stored is not None and stored.w >= hour_ms:
            # A replay: classify as the first attempt did. An unknown user whose row was first
            # written by a LATER hour was not admitted yet at this one (history only), which
            # also keeps this hour's compute batch, hence its shapes, as in the first attempt.
            if user_idx == 0 and stored.f > hour_ms:
                plans.append(plan)
                continue
            plan.kind, plan.start_row = REPLAYED, stored.e
            plan.new_user = user_idx == 0 and stored.f == hour_ms
        elif stored is not None:
            plan.kind, plan.start_row = UPDATE, stored.e
        elif user_idx > 0:
            plan.kind, plan.start_row = UPDATE, version.model_row(user_idx)
        elif len(hists.get(uid, ())) + len(events) >= min_events_new_user:
            plan.kind, plan.start_row, plan.new_user = UPDATE, version.model_row(0), True
        plans.append(plan)
    return plans


def compute_rows(
    version: LoadedVersion, plans: list[UserPlan], hists: Mapping[str, np.ndarray], cfg: IncrementalConfig,
    partition_of: Mapping[str, int] | None = None,
) -> dict[str, np.ndarray]:
    """New rows of every planned user with a row (UPDATE and REPLAYED), computed as one hour
    (streaming.update.run_jobs: fixed blocks of each partition's sorted users, so each row comes
    out of the same arithmetic in any attempt, on any member of the group). ``hists``: each
    user's history before the hour as item_idx (int [<= L], oldest first); ``partition_of``:
    each user's partition (None: all one)."""
    batch, jobs = row_jobs(plans, hists, partition_of)
    if not jobs:
        return {}
    run_jobs(version, [jobs], cfg)
    return {p.user_id: job.out for p, job in zip(batch, jobs)}


def row_jobs(
    plans: list[UserPlan], hists: Mapping[str, np.ndarray], partition_of: Mapping[str, int] | None = None
) -> tuple[list[UserPlan], list[RowJob]]:
    """(the plans with a row to compute, one RowJob each), in plan order. A plan's start row may
    be the RowJob of the user's previous hour (streaming.batch); ``partition_of``: each user's
    partition (None: all one)."""
    batch = [p for p in plans if p.kind in (UPDATE, REPLAYED)]
    if not batch:
        return [], []
    # the hour's negative sample is seeded by the hour itself: every attempt draws the same one
    hour = window_start(min(e.ts for p in batch for e in p.events)) // HOUR_MS
    part = partition_of or {}
    return batch, [RowJob(hour, p.start_row, p.user_idx, hists.get(p.user_id, NO_HISTORY), p.targets, part.get(p.user_id, 0)) for p in batch]


def read_state(
    state: StreamState, version: LoadedVersion, before: int | dict[str, int], uids: list[str], cache: UserCache | None
) -> tuple[dict[str, StoredRow], dict[str, np.ndarray], dict[str, int]]:
    """Rows and histories (item_idx) before ``before`` (one hour start for all, or one per user):
    from the cache where it holds the user, else from Redis (one batched read for all the
    others); and, for the users read, how many history events they have from ``before`` on
    (a cached user has none: the cache holds only users it can vouch for)."""
    rows: dict[str, StoredRow] = {}
    hists: dict[str, np.ndarray] = {}
    later: dict[str, int] = {}
    missing = []
    for uid in uids:
        entry = cache.get(uid) if cache is not None else None
        if entry is None:
            missing.append(uid)
            continue
        if entry.row is not None:
            rows[uid] = entry.row
        hists[uid] = entry.hist
    if missing:
        at = [before[u] for u in missing] if isinstance(before, dict) else before
        read_rows, read_hists, later = state.read_users(version.version, missing, at, version.history_len)
        rows.update(read_rows)
        index = version.item_index
        for uid in missing:
            hists[uid] = np.array([index.get(i, 0) for i in read_hists[uid]], dtype=np.int32)
    return rows, hists, later


def history_write(events: list[Event]) -> list[tuple[int, str]]:
    """(ts, member) of a user's events, in the order given: the history zset's order when the
    events come from streaming.windows.events_by_user."""
    return [(e.ts, rk.history_member(e.event_id, e.item_id)) for e in events]


def written_entry(
    plan: UserPlan, new_row: "np.ndarray | RowJob | None", row: StoredRow | None, hist: np.ndarray, hour_ms: int, history_len: int
) -> CachedUser:
    """What a read at the user's next hour returns after the hour's write did what it planned
    (``new_row`` written when UPDATE, every history event new), from the state before the hour
    (``row``, ``hist``); the write's history events are the plan's, in zset order
    (``plan.item_idx``). ``new_row`` is kept as given: an array the caller owns, or the RowJob
    that will compute it (streaming.batch plans a batch's hours before computing their rows)."""
    if plan.kind == UPDATE:
        n = (row.n if row is not None else 0) + plan.n_known
        first = row.f if row is not None and row.f >= 0 else hour_ms
        row = StoredRow(new_row, hour_ms, n, first)
    return CachedUser(row, next_history(hist, plan.item_idx, history_len))


def remember(
    cache: UserCache, version: LoadedVersion, hour_ms: int, plans: list[UserPlan], writes: list[UserWrite],
    outcomes: list[WriteOutcome], rows: dict[str, StoredRow], hists: dict[str, np.ndarray],
) -> None:
    """Carry each written user into the cache as a read before their next hour would see them,
    or drop them where the write says that cannot be vouched for (see streaming.user_cache)."""
    for plan, wr, out in zip(plans, writes, outcomes):
        uid = plan.user_id
        if not out.exact or (plan.kind == UPDATE and not out.applied):
            cache.drop(uid)
            continue
        cache.put(uid, written_entry(plan, wr.row, rows.get(uid), hists.get(uid, NO_HISTORY), hour_ms, version.history_len))


def hour_writes(
    hour_ms: int, plans: list[UserPlan], new_rows: dict[str, np.ndarray], partition_of: dict[str, int]
) -> tuple[HourResult, list[UserWrite]]:
    """The hour's counters (functions of its content) and one UserWrite per planned user (the row
    only for UPDATE), in plan order."""
    result = HourResult(hour_ms, sum(len(p.events) for p in plans))
    writes: list[UserWrite] = []
    counts: dict[int, list[int]] = {}  # partition -> [users, events, unknown, new]
    for plan in plans:
        c = counts.get(partition_of[plan.user_id])
        if c is None:
            c = counts[partition_of[plan.user_id]] = [0, 0, 0, 0]
        c[2] += len(plan.events) - plan.n_known
        if plan.kind == HISTORY_ONLY:
            result.history_only += 1
        else:  # UPDATE or REPLAYED
            c[0] += 1
            c[1] += plan.n_known
            c[3] += plan.new_user
        row = new_rows[plan.user_id] if plan.kind == UPDATE else None
        writes.append(UserWrite(plan.user_id, row, plan.n_known, history_write(plan.events)))
    for p, (users, events, unknown, new) in counts.items():
        result.per_partition[p] = {"users": users, "events": events, "unknown": unknown, "new": new}
        result.users_updated += users
        result.events_applied += events
        result.unknown_items += unknown
        result.new_users += new
    return result, writes


def apply_hour(
    state: StreamState, version: LoadedVersion, hour_ms: int, buffered: list[Buffered], cfg: IncrementalConfig,
    cache: UserCache | None = None,
) -> HourResult:
    """Apply one closed hour: plan, compute and write every touched user (see module docstring).
    ``cache`` (streaming.user_cache; for this version) saves the Redis reads of users it holds;
    any error drops it whole, since what was written is then unknown."""
    if cache is not None and cache.version != version.version:
        raise ValueError(f"the user cache belongs to version {cache.version}, not {version.version}")
    try:
        return _apply_hour(state, version, hour_ms, buffered, cfg, cache)
    except BaseException:
        if cache is not None:
            cache.clear()
        raise


def _apply_hour(
    state: StreamState, version: LoadedVersion, hour_ms: int, buffered: list[Buffered], cfg: IncrementalConfig,
    cache: UserCache | None,
) -> HourResult:
    t0 = time.perf_counter()
    by_user = events_by_user(buffered)
    partition_of = {b.event.user_id: b.partition for b in buffered}
    rows, hists, _ = read_state(state, version, hour_ms, list(by_user), cache)
    t1 = time.perf_counter()
    plans = plan_users(hour_ms, by_user, rows, hists, version, cfg.min_events_new_user)
    new_rows = compute_rows(version, plans, hists, cfg, partition_of)
    t2 = time.perf_counter()

    result, writes = hour_writes(hour_ms, plans, new_rows, partition_of)
    result.read_s, result.compute_s = t1 - t0, t2 - t1
    retention_ms = cfg.history_retention_s * 1000
    half = len(writes) // 2
    outcomes: list[WriteOutcome] = []
    for part_no, part in enumerate((writes[:half], writes[half:])):
        if part:
            outcomes += state.apply_users(version.version, hour_ms, part, version.history_len, retention_ms)
        if part_no == 0 and half:
            crash_point("mid_rows")
    result.rows_written = sum(o.applied for o in outcomes)
    if cache is not None:
        remember(cache, version, hour_ms, plans, writes, outcomes, rows, hists)
    result.seconds = time.perf_counter() - t0
    result.write_s = result.seconds - (t2 - t0)
    return result

"""Event-time hours, per-partition lateness, the min watermark and checkpoints (streaming.windows). Pure."""

from __future__ import annotations

import random

from hypothesis import given, settings as hsettings, strategies as st

from streaming.events import Event
from streaming.windows import (
    ALREADY_APPLIED,
    BUFFERED,
    HOUR_MS,
    LATE,
    NO_TS,
    Checkpoint,
    PartitionTracker,
    close_window,
    events_by_user,
    is_late,
    next_closable,
    seed_checkpoint,
    watermark,
    window_end,
    window_start,
)

H0 = 1_709_251_200_000  # 2024-03-01T00:00Z
MIN = 60_000
LATENESS = 10 * MIN


def ev(i: int, ts: int, user: str = "u1", item: str = "i1") -> Event:
    return Event(f"e{i}", user, item, "click", ts)


def test_window_boundaries():
    assert window_start(H0) == H0
    assert window_start(H0 + HOUR_MS - 1) == H0
    assert window_start(H0 + HOUR_MS) == H0 + HOUR_MS
    assert window_end(H0) == H0 + HOUR_MS


def test_lateness_is_relative_to_the_partitions_own_max_ts():
    end = H0 + HOUR_MS
    assert not is_late(H0 + 5, NO_TS, LATENESS)
    assert not is_late(H0 + 5, end + LATENESS - 1, LATENESS)
    assert is_late(H0 + 5, end + LATENESS, LATENESS)
    assert not is_late(end, end + LATENESS, LATENESS)  # the next hour is still open


def test_tracker_outcomes_and_prefix_state():
    t = PartitionTracker(0, next_offset=0)
    assert t.on_event(0, ev(0, H0 + 5 * MIN), LATENESS) == BUFFERED
    assert t.on_event(1, ev(1, H0 + HOUR_MS + 20 * MIN), LATENESS) == BUFFERED
    assert t.max_ts == H0 + HOUR_MS + 20 * MIN
    assert t.on_event(2, ev(2, H0 + 30 * MIN), LATENESS) == LATE  # hour 0 ended 20 min before max
    t.on_dead(3)
    assert (t.next_offset, t.dead, t.late) == (4, 1, 1)
    taken = t.take_window(H0)
    assert [b.offset for b in taken] == [0] and t.applied_through == H0
    assert t.on_event(4, ev(4, H0 + 59 * MIN), LATENESS) == LATE
    # the checkpoint is the first buffered record, with the prefix state before it
    assert t.checkpoint() == Checkpoint(1, H0 + 5 * MIN, 0, 0, H0)


def test_watermark_is_the_minimum_over_partitions_and_waits_for_every_partition():
    a, b = PartitionTracker(0, 0), PartitionTracker(1, 0)
    a.on_event(0, ev(0, H0 + 10 * MIN), LATENESS)
    assert watermark([a, b], LATENESS) is None  # b has seen nothing
    a.on_event(1, ev(1, H0 + 3 * HOUR_MS), LATENESS)
    b.on_event(0, ev(2, H0 + HOUR_MS + 5 * MIN), LATENESS)
    assert watermark([a, b], LATENESS) == H0 + HOUR_MS + 5 * MIN - LATENESS
    assert next_closable([a, b], LATENESS) is None  # b is not past hour 0's end + lateness yet
    b.on_event(1, ev(3, H0 + HOUR_MS + LATENESS), LATENESS)
    assert next_closable([a, b], LATENESS) == H0
    assert watermark([a, b], LATENESS, idle={1}) == H0 + 3 * HOUR_MS - LATENESS


def test_idle_partition_left_out_counts_later_events_of_closed_hours_as_late():
    a, b = PartitionTracker(0, 0), PartitionTracker(1, 0)
    a.on_event(0, ev(0, H0 + 5 * MIN), LATENESS)
    a.on_event(1, ev(1, H0 + 2 * HOUR_MS), LATENESS)
    assert next_closable([a, b], LATENESS) is None
    assert next_closable([a, b], LATENESS, idle={1}) == H0
    close_window([a, b], H0, idle={1})
    assert b.on_event(0, ev(2, H0 + 50 * MIN), LATENESS) == LATE


def feed(trackers: dict[int, PartitionTracker], logs: dict[int, list[Event]], schedule: list[int], applied: list, late_total: list):
    """Read one record from each partition in ``schedule`` order, closing hours as they close."""
    for p in schedule:
        t = trackers[p]
        if t.next_offset >= len(logs[p]):
            continue
        t.on_event(t.next_offset, logs[p][t.next_offset], LATENESS)
        while (h := next_closable(list(trackers.values()), LATENESS)) is not None:
            taken = close_window(list(trackers.values()), h)
            applied.append((h, sorted(b.event.event_id for b in taken)))
    late_total.append(sum(t.late for t in trackers.values()))


def make_logs(seed: int, n: int = 120) -> dict[int, list[Event]]:
    rng = random.Random(seed)
    logs: dict[int, list[Event]] = {0: [], 1: [], 2: []}
    for i in range(n):
        ts = H0 + i * 3 * MIN + rng.randint(-40 * MIN, 0)  # roughly in order, up to 40 min behind
        logs[rng.randrange(3)].append(ev(i, ts, user=f"u{i % 7}"))
    return logs


@hsettings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(0, 10_000))
def test_hour_contents_do_not_depend_on_how_partitions_are_interleaved(seed, order_seed):
    logs = make_logs(seed)
    total = sum(len(v) for v in logs.values())

    def run(order: list[int]):
        trackers = {p: PartitionTracker(p, 0) for p in logs}
        applied: list = []
        late: list = []
        feed(trackers, logs, order, applied, late)
        return applied, late[-1]

    round_robin = [p for _ in range(total) for p in logs]
    rng = random.Random(order_seed)
    shuffled = [p for p in logs for _ in range(len(logs[p]))]
    rng.shuffle(shuffled)
    assert run(round_robin) == run(shuffled)


@hsettings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 300))
def test_restart_from_checkpoints_reproduces_the_uninterrupted_run(seed, crash_after):
    logs = make_logs(seed)
    order = [p for _ in range(200) for p in logs]

    trackers = {p: PartitionTracker(p, 0) for p in logs}
    applied_ref: list = []
    late_ref: list = []
    feed(trackers, logs, order, applied_ref, late_ref)

    # first attempt: dies after `crash_after` reads; checkpoints were stored after each closed hour
    trackers = {p: PartitionTracker(p, 0) for p in logs}
    applied: list = []
    stored = {p: t.checkpoint() for p, t in trackers.items()}
    for step, p in enumerate(order[:crash_after]):
        before = len(applied)
        feed(trackers, logs, [p], applied, [])
        if len(applied) > before:
            stored = {q: t.checkpoint() for q, t in trackers.items()}
    applied_at_ckpt = [a for a in applied if a[0] <= max(c.applied_through for c in stored.values())]
    # restart: trackers from the stored checkpoints, the same reading order from there
    trackers = {p: PartitionTracker.from_checkpoint(p, c) for p, c in stored.items()}
    rest: list = []
    late: list = []
    feed(trackers, logs, order, rest, late)
    assert applied_at_ckpt + rest == applied_ref
    assert late[-1] == late_ref[-1]


def test_records_of_applied_hours_are_skipped_silently_after_a_restart():
    t = PartitionTracker.from_checkpoint(0, Checkpoint(offset=5, max_ts=H0 + 20 * MIN, applied_through=H0))
    assert t.on_event(5, ev(5, H0 + 30 * MIN), LATENESS) == ALREADY_APPLIED
    assert t.late == 0 and t.buffer == {}


def test_seed_checkpoint_takes_the_latest_snapshot_before_the_cutoff():
    cutoff = H0 + 24 * HOUR_MS
    snaps = [
        Checkpoint(10, H0, 1, 0, H0 + 20 * HOUR_MS),
        Checkpoint(30, H0 + 23 * HOUR_MS, 2, 1, H0 + 23 * HOUR_MS),  # exactly the hour before the cutoff
        Checkpoint(50, H0 + 26 * HOUR_MS, 3, 1, H0 + 25 * HOUR_MS),  # already past the cutoff: unusable
    ]
    assert seed_checkpoint(snaps, cutoff, fallback_offset=0) == Checkpoint(30, H0 + 23 * HOUR_MS, 2, 1, cutoff - HOUR_MS)
    assert seed_checkpoint(snaps[:1], cutoff, 0) == Checkpoint(10, H0, 1, 0, cutoff - HOUR_MS)
    assert seed_checkpoint([], cutoff, 7) == Checkpoint(7, NO_TS, 0, 0, cutoff - HOUR_MS)
    # a cutoff inside an hour applies that whole hour
    assert seed_checkpoint([], cutoff + 5 * MIN, 7).applied_through == cutoff - HOUR_MS


def test_checkpoint_json_round_trip():
    c = Checkpoint(12, H0, 3, 4, H0 - HOUR_MS)
    assert Checkpoint.from_json(c.to_json()) == c


def test_events_by_user_dedups_and_orders():
    from streaming.windows import Buffered

    e1 = ev(1, H0 + 3, "u2", "b")
    e2 = ev(2, H0 + 1, "u2", "a")
    e3 = ev(3, H0 + 2, "u1", "c")
    buffered = [Buffered(0, i, e, NO_TS, 0, 0) for i, e in enumerate([e1, e2, e3, e1])]
    out = events_by_user(buffered)
    assert list(out) == ["u1", "u2"]
    assert [e.event_id for e in out["u2"]] == ["e2", "e1"]


@hsettings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 3), st.integers(0, 3), st.sampled_from("abc")), max_size=60))
def test_events_by_user_is_the_sorted_deduplicated_grouping(rows):
    """Against the definition: stable sort by (ts, event_id, item_id), first of each event_id kept
    (ids repeat with different content here, and ts and items tie often), grouped by user, users sorted."""
    from streaming.windows import Buffered

    buffered = [Buffered(0, i, Event(f"e{n}", f"u{u}", item, "click", H0 + m * MIN), NO_TS, 0, 0) for i, (n, u, m, item) in enumerate(rows)]
    seen: set[str] = set()
    expected: dict[str, list[Event]] = {}
    for b in sorted(buffered, key=lambda b: (b.event.ts, b.event.event_id, b.event.item_id)):
        if b.event.event_id not in seen:
            seen.add(b.event.event_id)
            expected.setdefault(b.event.user_id, []).append(b.event)
    out = events_by_user(buffered)
    assert list(out) == sorted(expected) and out == expected


def test_on_event_lateness_boundary_is_inclusive():
    """Late exactly when the partition's max ts reaches the event's hour end + lateness (is_late)."""
    for max_ts, outcome in ((H0 + HOUR_MS + LATENESS, LATE), (H0 + HOUR_MS + LATENESS - 1, BUFFERED)):
        t = PartitionTracker(0, 0)
        t.on_event(0, ev(0, max_ts), LATENESS)
        assert t.on_event(1, ev(1, H0 + HOUR_MS - 1), LATENESS) == outcome


@hsettings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([-130, -70, -61, -60, -59, -10, -1, 0, 1, 10, 59, 60, 61, 70, 130]),
                          st.sampled_from(["event", "event", "dead", "close", "close_idle"])), max_size=80),
       st.sampled_from([0, LATENESS, HOUR_MS]))
def test_on_event_follows_the_definitions(steps, lateness):
    """on_event's inlined arithmetic against window_start / is_late, the applied and idle-closed
    marks, and the prefix state stored with each buffered event. Steps are whole minutes near
    the hour and lateness lengths, so events land exactly on those boundaries often."""
    from streaming.windows import Buffered

    t = PartitionTracker(3, 0)
    ts = H0
    for offset, (delta, what) in enumerate(steps):
        ts = max(H0, ts + delta * MIN)
        if what == "dead":
            t.on_dead(offset)
            continue
        if what.startswith("close"):
            t.close_through(window_start(ts) - HOUR_MS, idle=what == "close_idle")
        before = (t.max_ts, t.dead, t.late, t.applied_through, t.idle_closed_through)
        w = window_start(ts)
        if is_late(ts, t.max_ts, lateness) or w <= t.idle_closed_through:
            expected = LATE
        elif w <= t.applied_through:
            expected = ALREADY_APPLIED
        else:
            expected = BUFFERED
        assert t.on_event(offset, ev(offset, ts), lateness) == expected
        assert t.max_ts == max(before[0], ts) and t.next_offset == offset + 1
        assert t.late == before[2] + (expected == LATE)
        if expected == BUFFERED:
            b = t.buffer[w][-1]
            assert type(b) is Buffered and b == Buffered(3, offset, ev(offset, ts), before[0], before[1], before[2])
            assert b.window == w

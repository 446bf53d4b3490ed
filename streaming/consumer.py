"""The hourly incremental consumer: Kafka interactions -> user-ID rows in Redis, exactly-once in effect.

    python -m streaming.consumer --mode bounded      # what the hourly Airflow DAG runs
    python -m streaming.consumer --mode continuous   # long-running; SIGTERM finishes cleanly

One consumer group (``KafkaConfig.group_id``); the topic is keyed by user, so each member owns
its users' rows. Loop (DESIGN §10): poll -> validate (bad records to the dead-letter topic) ->
buffer by event-time hour -> apply every hour the watermark has closed (streaming.hour) ->
store the checkpoint -> commit offsets.

Two halves, so that the second core is not idle: this one owns the Kafka client (poll, parse,
buffer, positions, commits: kafka-python's consumer is not thread-safe), and the "applier" (a
thread by default, or a worker process; streaming.applier) writes the closed hours (Redis
reads, the update's tensor work, Redis writes), in order, while the next records are polled
and parsed. Closed hours go to the applier in batches (up to
MAX_HOURS_PER_BATCH), the next one queued behind the one being written (MAX_BATCHES_IN_FLIGHT);
positions are stored when a batch is written, so a backlog costs one checkpoint per batch, not
per hour. Batches are written strictly in order, and once one fails the applier refuses the
ones queued behind it (streaming.applier.InOrder).

Exactly-once effect: how a kill -9 at any point leaves Redis as an uninterrupted run would
-------------------------------------------------------------------------------------------
1. The content of an hour is a function of the log only. Lateness is judged per partition from
   its own prefix, and an hour closes when the MINIMUM of the partitions' max event ts passes
   its end plus the allowed lateness, so every non-late event of the hour has been read by then,
   whatever order partitions were polled in (streaming.windows).
2. An hour's row update is a pure function of the row before the hour, the user's history as of
   the hour's START (score < start; later events already in the zset do not matter), the
   hour's events and the frozen version, computed with the same batch shapes in every attempt
   and on any member of the group: an hour's blocks are cut per partition (streaming.update,
   streaming.hour).
3. Each user's row and history are written in ONE Lua script on keys sharing a hash tag; the
   row records the last hour it absorbed (field ``w``) and the script writes only if ``w`` is
   older. A replayed hour is a no-op for every user it already reached; the history add is
   ZADD NX (idempotent). Hour counters are SETs of values computed from the hour's content.
   A batch of hours is written with one read and two write round trips (streaming.batch):
   later hours are computed from the state the earlier writes are predicted to leave, and each
   such write is guarded by that prediction (refused when it does not hold, then redone from
   Redis), so a batch writes exactly what the hours applied one at a time would.
4. Offsets: an hour can be forgotten only after all of it is written, and events of open hours
   must be re-read after a crash. So the position that matters is NOT Kafka's committed offset
   but a per-partition checkpoint in Redis, written after each applied hour: the first offset
   still buffered for an open hour, plus the partition's exact prefix state there (max ts,
   dead/late counts) and the last hour applied. A restart seeks there and re-derives exactly the
   same decisions. Kafka offsets are committed to the same positions afterwards, for lag tools
   only (a commit refused during a rebalance is logged and retried at the next checkpoint).
   A kill between (3) and the checkpoint re-reads the hour, recomputes, and writes nothing new.
   The positions for a batch of hours are taken when the hours are closed (records read later
   only ever come after them) and stored after the applier has written the whole batch; a
   restart may therefore redo several hours, which (3) makes harmless, and a replayed user is
   classified as in the first attempt (streaming.hour, row field ``f``).

Version switch: when the Redis pointer moves, the consumer loads the new version and starts its
rows from the version's data cutoff: from the latest stored snapshot of each partition taken
before any hour >= cutoff was applied (exact), else from Kafka's offset for the cutoff time.
Hours from the cutoff on are then applied to the new version's rows, so nothing between the
cutoff and the publish is lost; hours before it are in the version's training data.

Dead letters go to ``KafkaConfig.dead_letter_topic`` (value: original payload + reason; headers:
reason code and source position) and never stop a partition. A per-partition mark in Redis
keeps a replay from producing them twice (a crash between produce and mark can duplicate one;
the source headers let readers drop it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import logging
import signal
import sys
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

from streaming.clients import BrokerWatch
from streaming.events import Limits, Rejection, dead_letter_headers, dead_letter_value, parse_event
from streaming.faults import crash_point
from streaming.gc_tuning import consumer_thresholds
from streaming.hour import HourResult
from streaming.state import StreamState
from streaming.applier import ProcessApplier, ShardedApplier, ThreadApplier, make_applier
from streaming.version import LoadedVersion, load_version
from streaming.windows import (
    HOUR_MS,
    LATE,
    Checkpoint,
    PartitionTracker,
    close_window,
    next_closable,
    seed_checkpoint,
    watermark,
)
from twotower.config import Settings, load_settings

log = logging.getLogger("streaming.consumer")

BOUNDED, CONTINUOUS = "bounded", "continuous"
PROGRESS_EVERY_S = 30.0
VERSION_CHECK_EVERY_S = 2.0
MAX_HOURS_PER_BATCH = 168
"""Closed hours handed to the applier at once; positions are stored after each batch."""
MAX_BATCHES_IN_FLIGHT = 2
"""Batches handed to the applier at once: the one it is applying and the next, queued, so that it
starts on the next as soon as it is done instead of when this thread next looks (a batch's
positions are stored when it is written; batches are written strictly in order)."""
MAX_RECORDS_AHEAD = 200_000
"""Records the reading thread may read while the applier is still on a batch, before it waits
(the buffered events of open hours are the consumer's memory: about 0.3 KB each)."""


class InFlight(NamedTuple):
    """A batch of hours handed to the applier: its result, the positions to store once it is
    written (taken when its hours were closed) and how many records had been read then."""

    future: Future
    positions: dict[int, Checkpoint]
    read_at_submit: int


def iso(ms: int | None) -> str:
    if ms is None:
        return "-"
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


@dataclass
class ConsumerReport:
    """What a run did (the hourly DAG logs it; ``lag`` is checked against a threshold)."""

    status: str = "ok"
    mode: str = BOUNDED
    version: str | None = None
    hours_applied: int = 0
    users_updated: int = 0
    rows_written: int = 0
    events_applied: int = 0
    new_users: int = 0
    records_read: int = 0
    events_in_hours: int = 0
    """Distinct events of the hours applied by this run."""
    events_open: int = 0
    """Events buffered for hours still open when the run ended (the next run re-reads them)."""
    dead_letters: int = 0
    late_events: int = 0
    lag: int | None = None
    lag_by_partition: dict[int, int] = field(default_factory=dict)
    watermark_ms: int | None = None
    open_hours: list[int] = field(default_factory=list)
    seconds: float = 0.0
    reading_seconds: float | None = None
    """From the first record read to the end (the run's throughput window: group join, version
    load and partition seeks come before it)."""
    first_record_at_ms: int | None = None
    """Wall clock (epoch ms) when the first record was read: where the window above began, so
    the windows of a group's members can be joined into one (benchmarks.stream_throughput)."""
    cached_users: dict[str, int] = field(default_factory=dict)
    """The user cache's hits, misses (Redis reads) and size at the end (streaming.user_cache)."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _listener(owner: "IncrementalConsumer"):
    """kafka-python rebalance callbacks, forwarded to the consumer."""
    from kafka import ConsumerRebalanceListener

    class Listener(ConsumerRebalanceListener):
        def on_partitions_revoked(self, revoked):
            owner.on_revoked(revoked)

        def on_partitions_assigned(self, assigned):
            owner.on_assigned(assigned)

    return Listener()


class IncrementalConsumer:
    """One member of the incremental consumer group (clients injected; see run_bounded)."""

    def __init__(self, settings: Settings, kafka_consumer, producer, redis_client, mode: str = BOUNDED):
        if mode not in (BOUNDED, CONTINUOUS):
            raise ValueError(f"mode must be {BOUNDED!r} or {CONTINUOUS!r}, got {mode!r}")
        self.s = settings
        self.kc = kafka_consumer
        self.producer = producer
        self.state = StreamState(redis_client, settings.redis.prefix)
        self.mode = mode
        self.cfg = settings.incremental
        self.topic = settings.kafka.topic
        self.lateness_ms = self.cfg.allowed_lateness_s * 1000
        self.limits = Limits(max_bytes=self.cfg.max_event_bytes, max_ahead_of_record_ms=self.cfg.max_event_ahead_s * 1000)
        self.version: LoadedVersion | None = None
        self.trackers: dict[int, PartitionTracker] = {}
        self.ends: dict[int, int] = {}  # bounded: stop offsets
        self.hw_known: set[int] = set()
        self.idle_since: dict[int, float] = {}
        self.dlq_next: dict[int, int] = {}
        self.assigned_once = False
        self.pending: set[int] = set()
        self.stop_requested = False
        self.report = ConsumerReport(mode=mode)
        self._last_ckpt = time.monotonic()
        self._last_version_check = 0.0
        self._last_progress = time.monotonic()
        self._dlq_pending = False
        self.broker = BrokerWatch(settings.kafka, f"incremental consumer (group {settings.kafka.group_id})")
        self._applier: ThreadApplier | ProcessApplier | ShardedApplier | None = None
        self._inflight: deque[InFlight] = deque()
        """Batches handed to the applier and not yet accounted for, oldest first."""
        self._first_record_at: float | None = None

    # --- partitions -----------------------------------------------------------------------

    def _tp(self, partition: int):
        from kafka import TopicPartition

        return TopicPartition(self.topic, partition)

    def on_revoked(self, revoked) -> None:
        """Forget revoked partitions: their state is in Redis and the next owner resumes there.
        Hours in flight are finished and their positions stored first, so the next owner does
        not redo them (redoing would be harmless, only slower).

        kafka-python runs this on its network thread, where a wait also holds back heartbeats.
        Before each join it is called with nothing revoked (the first join included, while a
        process applier still imports and loads the version): then there is nothing to finish
        or forget, and waiting for the worker's answer would keep the join from overlapping its
        start."""
        if not revoked:
            return
        # kafka-python refuses blocking consumer calls on its network thread (a RuntimeError that
        # fails the rebalance and the run): the batches' positions go to Redis, which is what any
        # next owner resumes from, and their Kafka commit waits for the owners' next one
        self._collect(kafka_commit=False)
        self._forget_users("partitions revoked")
        for tp in revoked:
            self.pending.discard(tp.partition)
            self.trackers.pop(tp.partition, None)
            self.ends.pop(tp.partition, None)
            self.hw_known.discard(tp.partition)
        if revoked:
            log.info("partitions %s revoked", sorted(tp.partition for tp in revoked))

    def on_assigned(self, assigned) -> None:
        """New partitions are paused here and started (checkpoint lookup, seek) by the loop:
        kafka-python runs this callback on its network thread, where blocking consumer calls
        (offsets for a time, end offsets) are not allowed."""
        self.assigned_once = True
        for tp in assigned:
            if tp.partition not in self.trackers:
                self.kc.pause(tp)
                self.pending.add(tp.partition)

    def _start_pending(self) -> None:
        parts = sorted(p for p in self.pending if p not in self.trackers)
        self.pending.clear()
        if not parts:
            return
        self._forget_users("partitions assigned")
        self._start_partitions(parts)
        for p in parts:
            self.kc.resume(self._tp(p))
        log.info(
            "assigned partitions %s of %s; resuming at offsets %s",
            parts, self.topic, {p: self.trackers[p].next_offset for p in parts},
        )

    def _start_partitions(self, parts: list[int]) -> None:
        assert self.version is not None
        stored = self.state.load_checkpoints(self.version.version)
        seeded: dict[int, Checkpoint] = {}
        fallback = None
        marks = self.state.dlq_marks()
        for p in parts:
            ckpt = stored.get(p)
            if ckpt is None:
                floor = self.version.data_cutoff_ms - self.version.data_cutoff_ms % HOUR_MS - HOUR_MS
                if fallback is None:
                    fallback = self._offsets_for_cutoff(parts)
                ckpt = seed_checkpoint(self.state.checkpoint_history(p, floor), self.version.data_cutoff_ms, fallback[p])
                seeded[p] = ckpt
            self.trackers[p] = PartitionTracker.from_checkpoint(p, ckpt)
            self.dlq_next[p] = max(marks.get(p, 0), self.dlq_next.get(p, 0))
            self.kc.seek(self._tp(p), ckpt.offset)
            self.idle_since.pop(p, None)
        if seeded:
            # stored at once, so that a restart resumes from the very same seed
            self.state.save_checkpoints(self.version.version, seeded, self.cfg.snapshot_retention_s * 1000)
            log.info(
                "version %s starts from its data cutoff %s: partitions %s seeded at offsets %s",
                self.version.version, iso(self.version.data_cutoff_ms), sorted(seeded), {p: c.offset for p, c in seeded.items()},
            )
        if self.mode == BOUNDED:
            self._set_ends(parts)

    def _offsets_for_cutoff(self, parts: list[int]) -> dict[int, int]:
        """Kafka's first offset at or after (cutoff - lateness - 1 h) per partition; the log
        start when the broker cannot say (always safe: hours before the cutoff are skipped)."""
        assert self.version is not None
        when = max(0, self.version.data_cutoff_ms - self.lateness_ms - HOUR_MS)
        tps = [self._tp(p) for p in parts]
        begin = self.kc.beginning_offsets(tps)
        out = {p: begin[self._tp(p)] for p in parts}
        try:
            found = self.kc.offsets_for_times({tp: when for tp in tps})
        except Exception as exc:  # noqa: BLE001 - an old broker without the API: read from the start
            log.warning("offsets_for_times failed (%s); reading those partitions from their start", exc)
            return out
        ends = self.kc.end_offsets(tps)
        for tp, hit in found.items():
            out[tp.partition] = max(begin[tp], hit.offset if hit is not None else ends[tp])
        return out

    def _set_ends(self, parts: list[int]) -> None:
        """Bounded mode stops at the log end seen at start. The ListOffsets answer is a lower
        bound (the local broker reports the last batch's base offset + 1); the high watermark of
        the first fetch response raises it (see _learn_ends)."""
        ends = self.kc.end_offsets([self._tp(p) for p in parts])
        for tp, end in ends.items():
            self.ends[tp.partition] = max(int(end), self.ends.get(tp.partition, 0))

    def _learn_ends(self) -> None:
        for p in list(self.trackers):
            if p in self.hw_known:
                continue
            hw = self.kc.highwater(self._tp(p))
            if hw is not None:
                self.ends[p] = max(self.ends.get(p, 0), int(hw))
                self.hw_known.add(p)

    def _caught_up(self) -> bool:
        if not self.trackers:
            return False
        return all(p in self.hw_known and t.next_offset >= self.ends.get(p, 0) for p, t in self.trackers.items())

    # --- records ----------------------------------------------------------------------------

    def _ingest(self, partition: int, records) -> None:
        tracker = self.trackers.get(partition)
        if tracker is None:
            return
        # Runs once per record (~10^5 a second): loop-invariant lookups are hoisted, and the
        # report's counters are summed locally and added once per batch (also when a bounded
        # run pauses at its end).
        end = self.ends.get(partition, 1 << 62) if self.mode == BOUNDED else 1 << 62
        limits, lateness_ms, on_event = self.limits, self.lateness_ms, tracker.on_event
        read = late = 0
        try:
            for r in records:
                offset = r.offset
                if offset < tracker.next_offset:
                    continue  # delivered again after a seek
                if offset >= end:
                    self.kc.pause(self._tp(partition))
                    return
                if not read and self._first_record_at is None:
                    self._first_record_at = time.monotonic()
                    self.report.first_record_at_ms = int(time.time() * 1000)
                read += 1
                parsed = parse_event(r.value, r.key, r.timestamp, limits)
                if isinstance(parsed, Rejection):
                    self._dead_letter(r, parsed)
                    tracker.on_dead(offset)
                    continue
                # buffered for its hour, or late (counted), or of an hour already applied (a re-read)
                if on_event(offset, parsed, lateness_ms) == LATE:
                    late += 1
        finally:
            self.report.records_read += read
            self.report.late_events += late
        self.idle_since.pop(partition, None)

    def _dead_letter(self, record, rejection: Rejection) -> None:
        self.report.dead_letters += 1
        if record.offset < self.dlq_next.get(record.partition, 0):
            return  # produced before a restart
        source = f"{record.topic}/{record.partition}@{record.offset}"
        self.producer.send(
            self.s.kafka.dead_letter_topic,
            key=record.key,
            value=dead_letter_value(record.value, rejection, source),
            headers=dead_letter_headers(rejection, record.topic, record.partition, record.offset),
        )
        self.dlq_next[record.partition] = record.offset + 1
        self._dlq_pending = True
        log.warning("dead letter %s: %s (%s)", source, rejection.code, rejection.message)

    # --- hours -----------------------------------------------------------------------------

    def _idle_partitions(self) -> set[int]:
        if self.mode != CONTINUOUS or self.cfg.idle_partition_s <= 0:
            return set()
        now = time.monotonic()
        idle = set()
        for p, t in self.trackers.items():
            hw = self.kc.highwater(self._tp(p))
            if hw is None or t.next_offset < hw:
                self.idle_since.pop(p, None)
                continue
            since = self.idle_since.setdefault(p, now)
            if now - since >= self.cfg.idle_partition_s:
                idle.add(p)
        return idle

    def _submit_closable(self) -> None:
        """Close every hour the watermark has passed and hand them, in order, to the applier
        thread, which writes them while this thread polls and parses the next records.

        The positions to store once they are written are taken now, right after the hours were
        taken out of the buffers: they say "these hours applied, everything after them still to
        read", and records ingested meanwhile only ever come after them.
        """
        if len(self._inflight) >= MAX_BATCHES_IN_FLIGHT or self.stop_requested:
            return
        if self._version_moved():
            self._switch_version()
            return
        trackers = list(self.trackers.values())
        idle = self._idle_partitions()
        hours: list[tuple[int, list]] = []
        while len(hours) < MAX_HOURS_PER_BATCH:
            hour = next_closable(trackers, self.lateness_ms, idle)
            if hour is None:
                break
            hours.append((hour, close_window(trackers, hour, idle)))
        if not hours:
            return
        positions = {p: t.checkpoint() for p, t in self.trackers.items()}
        if self._applier is None:
            self._applier = make_applier(self.s, self.state, self.version.version if self.version else None)
        self._inflight.append(InFlight(self._applier.submit(self.version, hours), positions, self.report.records_read))

    def _drain_closable(self) -> None:
        """Apply every closable hour now, batch after batch (the end of a bounded run)."""
        while True:
            self._submit_closable()
            if not self._inflight:
                return
            self._collect_oldest()

    def _collect(self, kafka_commit: bool = True) -> None:
        """Wait for every batch in flight and account for it (see _collect_oldest)."""
        while self._inflight:
            self._collect_oldest(kafka_commit)

    def _collect_done(self) -> None:
        """Account for the batches the applier has finished, oldest first, without waiting."""
        while self._inflight and self._inflight[0].future.done():
            self._collect_oldest()

    def _collect_oldest(self, kafka_commit: bool = True) -> None:
        """Wait for the oldest batch in flight (an applier error is raised here, before anything
        claims its hours done), account for it and store the positions taken when it closed
        (committed to Kafka too unless ``kafka_commit`` is False). Batches finish in the order
        they were handed over, so positions only move forward."""
        batch = self._inflight.popleft()
        results = batch.future.result()
        assert self.version is not None
        for result in results:
            self._account(result)
        positions = {p: c for p, c in batch.positions.items() if p in self.trackers}
        self._store_positions(positions, published=True, kafka_commit=kafka_commit)

    def _account(self, result: HourResult) -> None:
        self.report.hours_applied += 1
        self.report.events_in_hours += result.events_in_hour
        self.report.users_updated += result.users_updated
        self.report.rows_written += result.rows_written
        self.report.events_applied += result.events_applied
        self.report.new_users += result.new_users

    # --- checkpoints -------------------------------------------------------------------------

    def _checkpoint(self) -> None:
        """Store every owned partition's current resume point (after the hours in flight are
        written: only then does the trackers' state describe what Redis holds)."""
        self._collect()
        self._store_positions({p: t.checkpoint() for p, t in self.trackers.items()}, published=False)

    def _store_positions(self, ckpts: dict[int, Checkpoint], published: bool, kafka_commit: bool = True) -> None:
        """Store resume points in Redis, then commit the same offsets to Kafka (for lag tools)
        unless ``kafka_commit`` is False."""
        assert self.version is not None
        if self._dlq_pending:
            self.producer.flush()  # dead letters are durable before we claim we are past them
            self._dlq_pending = False
        self.state.save_checkpoints(self.version.version, ckpts, self.cfg.snapshot_retention_s * 1000)
        self.state.save_dlq_marks({p: o for p, o in self.dlq_next.items() if p in ckpts})
        mark = watermark(list(self.trackers.values()), self.lateness_ms)
        lag = self._lag()
        now_ms = int(time.time() * 1000)
        last = max((c.applied_through for c in ckpts.values()), default=None)
        self.state.set_status(self.version.version, mark, last if published else None, now_ms if published else None, now_ms)
        self.state.set_lag(lag)
        self.report.watermark_ms = mark
        if published:
            crash_point("after_checkpoint")
        if kafka_commit:
            self._commit(ckpts)
        self._last_ckpt = time.monotonic()

    def _lag(self) -> dict[int, int]:
        lag = {}
        for p, t in self.trackers.items():
            hw = self.kc.highwater(self._tp(p))
            end = max(hw if hw is not None else 0, self.ends.get(p, 0))
            lag[p] = max(0, end - t.next_offset)
        return lag

    def _commit(self, ckpts: dict[int, Checkpoint]) -> None:
        from kafka.errors import CommitFailedError, KafkaError, RebalanceInProgressError
        from kafka.structs import OffsetAndMetadata

        offsets = {self._tp(p): OffsetAndMetadata(c.offset, "", -1) for p, c in ckpts.items()}
        if not offsets:
            return
        try:
            self.kc.commit(offsets)
        except (RebalanceInProgressError, CommitFailedError) as exc:
            # Redis holds the authoritative positions; Kafka's copy catches up at the next one
            log.warning("offset commit skipped during a group rebalance (%s); positions are safe in Redis", type(exc).__name__)
        except KafkaError as exc:
            log.warning("offset commit failed (%s); positions are safe in Redis", exc)

    # --- versions ----------------------------------------------------------------------------

    def load_current_version(self) -> bool:
        current = self.state.current_version()
        if current is None:
            return False
        self.version = load_version(self.s, current, self.state.version_meta(current))
        self.report.version = current
        return True

    def _forget_users(self, why: str) -> None:
        """Drop the applier's user cache (streaming.user_cache): another member may write those
        users now. Called with no hour in flight."""
        if self._applier is not None:
            self._applier.forget_users(why)

    def _version_moved(self) -> bool:
        now = time.monotonic()
        if now - self._last_version_check < VERSION_CHECK_EVERY_S:
            return False
        self._last_version_check = now
        current = self.state.current_version()
        return current is not None and self.version is not None and current != self.version.version

    def _switch_version(self) -> None:
        old = self.version.version if self.version else None
        self._checkpoint()  # the old version's progress, in case it is rolled back to
        self.load_current_version()
        log.info("model version moved from %s to %s: replaying from its data cutoff into its rows", old, self.report.version)
        keep = self.state.published_versions() | {self.report.version or "", old or ""}
        gone = self.state.forget_versions(keep)
        if gone:
            log.info("forgot the consumer state of unpublished versions %s", gone)
        parts = sorted(self.trackers)
        for p in parts:
            self.kc.resume(self._tp(p))
        self.trackers.clear()
        self.hw_known.clear()
        self._start_partitions(parts)

    # --- the loop ----------------------------------------------------------------------------

    def request_stop(self, *_: Any) -> None:
        if not self.stop_requested:
            log.info("stop requested: finishing the current write, storing positions, leaving the group")
        self.stop_requested = True

    def _progress(self) -> None:
        if time.monotonic() - self._last_progress < PROGRESS_EVERY_S:
            return
        self._last_progress = time.monotonic()
        lag = self._lag()
        log.info(
            "progress: %d records read (%d dead letters, %d late), %d hours applied, watermark %s, lag %d",
            self.report.records_read, self.report.dead_letters, self.report.late_events,
            self.report.hours_applied, iso(watermark(list(self.trackers.values()), self.lateness_ms)), sum(lag.values()),
        )

    def run(self, max_seconds: float | None = None) -> ConsumerReport:
        import torch
        from threadpoolctl import threadpool_limits

        threads = torch.get_num_threads()
        torch.set_num_threads(max(1, self.cfg.threads))
        try:
            # numpy's BLAS would start a thread per core for each of an hour's small products,
            # which then compete with the reading thread and Redis (measured: 13% fewer events/s)
            with threadpool_limits(limits=max(1, self.cfg.threads), user_api="blas"), consumer_thresholds():
                return self._run(max_seconds)
        finally:
            if self._applier is not None:
                self._applier.close()
                self._applier = None
            torch.set_num_threads(threads)

    def _run(self, max_seconds: float | None) -> ConsumerReport:
        t0 = time.monotonic()
        if not self.load_current_version():
            if self.mode == BOUNDED:
                self.report.status = "no_version"
                log.warning("no model version is published yet (no %s:pointer); nothing to update", self.s.redis.prefix)
                return self.report
            while not self.stop_requested and not self.load_current_version():
                time.sleep(5.0)
            if self.version is None:
                return self.report
        # what lives for the whole run (modules, the loaded model) leaves the garbage collector's
        # full scans, which otherwise walk it again and again while records are buffered (about
        # 2 µs per record measured); objects loaded later are collected as usual
        gc.freeze()
        # the applier starts now: a worker process imports and loads the version while we join
        self._applier = make_applier(self.s, self.state, self.version.version if self.version else None)
        self.kc.subscribe([self.topic], listener=_listener(self))
        join_deadline = time.monotonic() + max(30.0, 4 * self.s.kafka.session_timeout_ms / 1000)
        while True:
            if self.stop_requested:
                break
            if max_seconds is not None and time.monotonic() - t0 > max_seconds:
                log.warning("stopping after the %.0fs limit", max_seconds)
                self.report.status = "time_limit"
                break
            # the hours submitted last time are written by the applier thread during this poll and parse
            batch = self.kc.poll(timeout_ms=500, max_records=self.cfg.poll_max_records)
            self.broker.check()  # says in words when the broker is lost and when it is back
            if self.pending:
                self._collect()
                self._start_pending()
                continue  # anything fetched before the seek is from the wrong offset
            if self.mode == BOUNDED:
                self._learn_ends()  # before ingesting: the fetch that brought records also brought the end
            for tp, records in batch.items():
                self._ingest(tp.partition, records)
            if self._dlq_pending:
                # dead letters marked as soon as they are durable: a restart does not send them again
                self.producer.flush()
                self.state.save_dlq_marks({p: o for p, o in self.dlq_next.items() if p in self.trackers})
                self._dlq_pending = False
            if self.trackers:
                # the applier works while this thread reads on, with the next batch already queued
                # behind the one it is on (no idle gap between them); it is only waited for when
                # this thread has read a backlog's worth ahead of it (memory)
                self._collect_done()
                if self._inflight and self.report.records_read - self._inflight[0].read_at_submit > MAX_RECORDS_AHEAD:
                    self._collect()
                self._submit_closable()
                if self.mode == CONTINUOUS and time.monotonic() - self._last_ckpt >= self.cfg.checkpoint_interval_s:
                    self._checkpoint()
                self._progress()
            if self.mode == BOUNDED:
                if self._caught_up():
                    break
                if not self.assigned_once and time.monotonic() > join_deadline:
                    self.report.status = "no_partitions"
                    log.warning("no partitions assigned within the join timeout; another member may own them all")
                    break
        if self.trackers and self.version is not None:
            if not self.stop_requested:
                self._last_version_check = 0.0
                self._drain_closable()
            self._checkpoint()
        self._finish(t0)
        return self.report

    def _finish(self, t0: float) -> None:
        lag = self._lag() if self.trackers else {}
        self.report.lag_by_partition = lag
        self.report.lag = sum(lag.values()) if self.trackers else None
        self.report.open_hours = sorted({w for t in self.trackers.values() for w in t.buffer})
        self.report.events_open = sum(len(b) for t in self.trackers.values() for b in t.buffer.values())
        self.report.seconds = round(time.monotonic() - t0, 3)
        if self._first_record_at is not None:
            self.report.reading_seconds = round(time.monotonic() - self._first_record_at, 3)
        if self._applier is not None:
            self.report.cached_users = self._applier.cache_stats()
        log.info(
            "%s run done: %d hours applied (%d users, %d events), %d records read, %d dead letters, %d late, "
            "watermark %s, lag %s, %d hours still open, %.1fs",
            self.mode, self.report.hours_applied, self.report.users_updated, self.report.events_applied,
            self.report.records_read, self.report.dead_letters, self.report.late_events, iso(self.report.watermark_ms),
            self.report.lag, len(self.report.open_hours), self.report.seconds,
        )


def _clients(settings: Settings):
    from jobs.redis_conn import redis_client
    from streaming.clients import make_consumer, make_producer

    consumer = make_consumer(settings.kafka, group_id=settings.kafka.group_id, max_poll_interval_ms=600_000)
    producer = make_producer(settings.kafka)
    return consumer, producer, redis_client(settings)


def run(settings: Settings, mode: str, max_seconds: float | None = None, handle_signals: bool = False) -> dict[str, Any]:
    """Run the consumer in ``mode`` with clients from the factories; returns the report dict."""
    consumer, producer, client = _clients(settings)
    worker = IncrementalConsumer(settings, consumer, producer, client, mode)
    if handle_signals:
        signal.signal(signal.SIGTERM, worker.request_stop)
        signal.signal(signal.SIGINT, worker.request_stop)
    try:
        return worker.run(max_seconds=max_seconds).as_dict()
    finally:
        consumer.close()  # leaves the group at once, so the next run joins without waiting
        producer.close()
        client.close()


def run_bounded(settings: Settings, max_seconds: float | None = None) -> dict[str, Any]:
    """Apply every hour closed up to the log end seen at start, then exit (the hourly DAG)."""
    return run(settings, BOUNDED, max_seconds=max_seconds)


def run_continuous(settings: Settings) -> dict[str, Any]:
    """Run until SIGTERM/SIGINT; the current write finishes, positions are stored, then exit."""
    return run(settings, CONTINUOUS, handle_signals=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m streaming.consumer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=[BOUNDED, CONTINUOUS], default=BOUNDED)
    parser.add_argument("--max-seconds", type=float, default=None, help="bounded mode: stop after this long")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)
    logging.getLogger("kafka.net.selector").setLevel(logging.ERROR)  # "task ran for 0.3s" noise on busy hosts
    # a broker outage makes these print ~10 lines a second; BrokerWatch says it once, in words
    logging.getLogger("kafka.net").setLevel(logging.CRITICAL)
    logging.getLogger("kafka.cluster").setLevel(logging.CRITICAL)
    settings = load_settings()
    report = run(settings, args.mode, max_seconds=args.max_seconds, handle_signals=True)
    import json

    print(json.dumps(report, sort_keys=True))
    return 0 if report["status"] in ("ok", "no_version") else 1


if __name__ == "__main__":
    sys.exit(main())

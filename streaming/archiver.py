"""Land the interactions topic as raw Parquet, so the nightly batch trains on what the stream saw.

    python -m streaming.archiver --mode bounded      # up to the log end seen at start, then exit
    python -m streaming.archiver --mode continuous   # until SIGTERM

Every valid event (streaming.events; invalid ones are the consumer's dead letters) is written
to ``raw/dt=YYYY-MM-DD/part-hHH.parquet`` (RAW_EVENT_SCHEMA, ``hour`` column = HH): one file per
UTC hour of event time. Late events land in their own hour's file, whenever they arrive.

Exactly-once in effect, by deduplication: a flush reads the event ids already in the day
(every file of ``dt=D``, including ones the batch ingest wrote), keeps only new events, merges
them into the hour's file and replaces that file atomically (write to a temporary name, then
rename). Offsets are committed only after the flush, so a crash re-reads events that the next
flush finds already landed. A reader that opens an hour file once sees it before or after a
flush, never half of one; the nightly, whose Spark opens files more than once, reads hard links
made under the day's lock (jobs.raw_snapshot). The read-merge-replace of a day runs under the day's write lock
(twotower.atomic.dir_lock, which the batch ingest takes too): two archivers landing the same
hour at once (the hourly DAG's run beside a continuous one, or two members of the group across
a rebalance) would otherwise each merge into the file as they read it, and the later rename
would drop the other's events after both had committed their offsets.

After each flush and at the end of a run it records what it did in Redis (``<prefix>:archive``,
``archive_status``: when it last ran and last landed events, the newest event time landed, the
run's counts), which ``make status`` shows as ``archive``. Failing to record that is logged and
does not fail the landing.

Who runs it: the hourly DAG (dags/hourly_incremental.py, task ``archive``, beside the consumer)
and ``make run`` after its replay, each in bounded mode; its consumer group is its own
(``KafkaConfig.archiver_group_id``), so it reads every record whatever the consumer does.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import signal
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from streaming.events import Event, Limits, Rejection, parse_event
from twotower import redis_keys
from twotower.atomic import dir_lock
from twotower.config import Settings, load_settings
from twotower.contracts import RAW_EVENT_SCHEMA, day_of_ms, raw_partition

log = logging.getLogger("streaming.archiver")

FLUSH_EVERY_S = 60.0
FLUSH_EVERY_EVENTS = 200_000


@dataclass
class ArchiveReport:
    status: str = "ok"
    records_read: int = 0
    invalid: int = 0
    events_written: int = 0
    duplicates_skipped: int = 0
    files_written: int = 0
    flushes: int = 0
    seconds: float = 0.0
    days: list[str] = field(default_factory=list)


def archive_status(previous: dict[str, Any] | None, report: ArchiveReport, newest_ts: int | None, now_ms: int) -> dict[str, Any]:
    """What ``<prefix>:archive`` holds after a flush or at the end of a run (pure): ``checked_at``
    (epoch ms, wall clock: the archiver last read the topic up to where it stopped), ``landed_at``
    (the last flush that had events to land, new or already there: one whose newest event time
    ``newest_ts`` is not None), ``newest_event_ts`` (the
    latest event time ever landed: how far raw Parquet reaches), and the current run's
    ``events_written``, ``duplicates_skipped``, ``invalid`` and ``status``."""
    previous = previous or {}
    newest = max((t for t in (previous.get("newest_event_ts"), newest_ts) if t is not None), default=None)
    return {
        "checked_at": now_ms,
        "landed_at": now_ms if newest_ts is not None else previous.get("landed_at"),
        "newest_event_ts": newest,
        "events_written": report.events_written,
        "duplicates_skipped": report.duplicates_skipped,
        "invalid": report.invalid,
        "status": report.status,
    }


def hour_file(raw_dir: Path, day: dt.date, hour: int) -> Path:
    return raw_partition(raw_dir, day) / f"part-h{hour:02d}.parquet"


def events_table(events: list[Event]) -> pa.Table:
    """Events -> RAW_EVENT_SCHEMA table (pure)."""
    ts = np.array([e.ts for e in events], dtype=np.int64)
    return pa.table(
        {
            "event_id": [e.event_id for e in events],
            "user_id": [e.user_id for e in events],
            "item_id": [e.item_id for e in events],
            "event_type": [e.event_type for e in events],
            "ts": pa.array(ts, pa.int64()),
            "weight": pa.array([e.weight for e in events], pa.float32()),
            "hour": pa.array(((ts // 3_600_000) % 24).astype(np.int32), pa.int32()),
        },
        schema=RAW_EVENT_SCHEMA,
    )


def existing_event_ids(day_dir: Path) -> set[str]:
    """Event ids already landed in a day partition (every Parquet file in it)."""
    ids: set[str] = set()
    if day_dir.is_dir():
        for f in sorted(day_dir.glob("*.parquet")):
            ids.update(pq.read_table(f, columns=["event_id"])["event_id"].to_pylist())
    return ids


def _atomic_write(table: pa.Table, path: Path) -> None:
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def land_events(raw_dir: Path, events: list[Event]) -> dict[str, int]:
    """Merge events into their day/hour files, skipping event ids already in the day (each day
    under its write lock). Returns the counts ``written``, ``duplicates`` (already in
    the day, or repeated within ``events``) and ``files`` (hour files replaced)."""
    by_day: dict[dt.date, list[Event]] = {}
    for e in events:
        by_day.setdefault(day_of_ms(e.ts), []).append(e)
    written = dupes = files = 0
    for day, day_events in sorted(by_day.items()):
        day_dir = raw_partition(raw_dir, day)
        with dir_lock(day_dir):  # the ids read here must still be all the day holds at the rename
            day_dir.mkdir(parents=True, exist_ok=True)
            counts = _land_day(raw_dir, day, day_events, existing_event_ids(day_dir))
        written, dupes, files = written + counts[0], dupes + counts[1], files + counts[2]
    return {"written": written, "duplicates": dupes, "files": files}


def _land_day(raw_dir: Path, day: dt.date, events: list[Event], have: set[str]) -> tuple[int, int, int]:
    """Merge the events not in ``have`` into their hour files of ``day``; (written, duplicates,
    files). The caller holds the day's lock."""
    fresh: dict[str, Event] = {}
    for e in events:
        if e.event_id not in have and e.event_id not in fresh:
            fresh[e.event_id] = e
    by_hour: dict[int, list[Event]] = {}
    for e in fresh.values():
        by_hour.setdefault((e.ts // 3_600_000) % 24, []).append(e)
    for hour, hour_events in sorted(by_hour.items()):
        path = hour_file(raw_dir, day, hour)
        table = events_table(hour_events)
        if path.exists():
            table = pa.concat_tables([pq.read_table(path).cast(RAW_EVENT_SCHEMA), table])
        _atomic_write(table.sort_by([("ts", "ascending"), ("event_id", "ascending")]), path)
    return len(fresh), len(events) - len(fresh), len(by_hour)


class Archiver:
    """Consume the topic (its own consumer group) and land it (clients injected)."""

    def __init__(self, settings: Settings, kafka_consumer, mode: str = "bounded", record: Callable[[ArchiveReport, int | None], None] | None = None):
        """``record(report, newest event ts of the flush or None when it had no events)`` is
        called after each flush and at the end (``run_archiver`` writes ``archive_status``)."""
        self.s = settings
        self.kc = kafka_consumer
        self.mode = mode
        self.record = record
        self.limits = Limits(max_bytes=settings.incremental.max_event_bytes, max_ahead_of_record_ms=settings.incremental.max_event_ahead_s * 1000)
        self.buffer: list[Event] = []
        self.pending: dict[Any, int] = {}  # TopicPartition -> next offset, committed after a flush
        self.ends: dict[Any, int] = {}
        self.stop_requested = False
        self.report = ArchiveReport()
        self._days: set[str] = set()

    def request_stop(self, *_: Any) -> None:
        self.stop_requested = True

    def _flush(self) -> None:
        from kafka.errors import KafkaError
        from kafka.structs import OffsetAndMetadata

        newest = max((e.ts for e in self.buffer), default=None)
        if self.buffer:
            counts = land_events(self.s.paths.raw_dir, self.buffer)
            self.report.events_written += counts["written"]
            self.report.duplicates_skipped += counts["duplicates"]
            self.report.files_written += counts["files"]
            self._days.update(day_of_ms(e.ts).isoformat() for e in self.buffer)
            log.info("landed %d new events (%d already there) in %d hour files", counts["written"], counts["duplicates"], counts["files"])
            self.buffer = []
        if self.pending:
            try:
                self.kc.commit({tp: OffsetAndMetadata(o, "", -1) for tp, o in self.pending.items()})
                self.pending = {}
            except KafkaError as exc:  # a rebalance: the events are landed; a re-read is deduplicated
                log.warning("archiver offset commit failed (%s); those records will be re-read and deduplicated", type(exc).__name__)
        self.report.flushes += 1
        if self.record is not None:
            self.record(self.report, newest)

    def run(self, max_seconds: float | None = None) -> ArchiveReport:
        t0 = time.monotonic()
        self.kc.subscribe([self.s.kafka.topic])
        last_flush = time.monotonic()
        join_deadline = t0 + max(30.0, 4 * self.s.kafka.session_timeout_ms / 1000)
        while not self.stop_requested:
            if max_seconds is not None and time.monotonic() - t0 > max_seconds:
                self.report.status = "time_limit"
                break
            batch = self.kc.poll(timeout_ms=500, max_records=self.s.incremental.poll_max_records)
            for tp in self.kc.assignment():
                if tp not in self.ends:
                    hw = self.kc.highwater(tp)
                    if hw is not None:
                        self.ends[tp] = max(int(hw), self.kc.end_offsets([tp])[tp])
            for tp, records in batch.items():
                for r in records:
                    if self.mode == "bounded" and tp in self.ends and r.offset >= self.ends[tp]:
                        self.kc.pause(tp)
                        break
                    self.report.records_read += 1
                    parsed = parse_event(r.value, r.key, r.timestamp, self.limits)
                    if isinstance(parsed, Rejection):
                        self.report.invalid += 1
                    else:
                        self.buffer.append(parsed)
                    self.pending[tp] = r.offset + 1
            if len(self.buffer) >= FLUSH_EVERY_EVENTS or time.monotonic() - last_flush >= FLUSH_EVERY_S:
                self._flush()
                last_flush = time.monotonic()
            if self.mode == "bounded":
                assigned = self.kc.assignment()
                if assigned and all(tp in self.ends and self.kc.position(tp) >= self.ends[tp] for tp in assigned):
                    break
                if not assigned and time.monotonic() > join_deadline:
                    self.report.status = "no_partitions"
                    break
        self._flush()
        self.report.days = sorted(self._days)
        self.report.seconds = round(time.monotonic() - t0, 3)
        log.info(
            "archiver %s run done: %d records read, %d events landed, %d duplicates skipped, %d invalid, days %s, %.1fs",
            self.mode, self.report.records_read, self.report.events_written, self.report.duplicates_skipped,
            self.report.invalid, ", ".join(self.report.days) or "-", self.report.seconds,
        )
        return self.report


def run_archiver(settings: Settings, mode: str = "bounded", max_seconds: float | None = None, handle_signals: bool = False) -> dict[str, Any]:
    """Run the archiver with a consumer from the factory; returns the report dict."""
    from streaming.clients import make_consumer

    from jobs.redis_conn import redis_client

    consumer = make_consumer(settings.kafka, group_id=settings.kafka.archiver_group_id)
    client = redis_client(settings)
    archiver = Archiver(settings, consumer, mode, record=_status_recorder(client, settings.redis.prefix))
    if handle_signals:
        signal.signal(signal.SIGTERM, archiver.request_stop)
        signal.signal(signal.SIGINT, archiver.request_stop)
    try:
        return asdict(archiver.run(max_seconds=max_seconds))
    finally:
        consumer.close()
        client.close()


def _status_recorder(client, prefix: str) -> Callable[[ArchiveReport, int | None], None]:
    """Archiver.record writing ``archive_status`` to ``<prefix>:archive``; a Redis error is logged,
    not raised (the events are on disk and their offsets committed: only the status line is stale)."""
    from redis.exceptions import RedisError

    from streaming.status import archive_record

    def record(report: ArchiveReport, newest_ts: int | None) -> None:
        try:
            status = archive_status(archive_record(client, prefix), report, newest_ts, int(time.time() * 1000))
            client.set(redis_keys.archive(prefix), json.dumps(status, sort_keys=True))
        except RedisError as exc:
            log.warning("could not record the archiver's status in Redis (%s): the events are landed, `make status` shows an older landing", exc)

    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m streaming.archiver", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["bounded", "continuous"], default="bounded")
    parser.add_argument("--max-seconds", type=float, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)
    report = run_archiver(load_settings(), args.mode, args.max_seconds, handle_signals=True)
    print(report)
    return 0 if report["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())

"""Replay raw events into Kafka in event-time order, so the streaming path runs on real data.

    python -m streaming.replayer --start 1998-03-01 --end 1998-03-08 --speedup 3600

Reads raw Parquet (``settings.paths.raw_dir``, DESIGN §3) for ``[start, end)`` and publishes each
event as the contract's JSON value, keyed by ``user_id``, with the Kafka record timestamp set
to the event time (so offsets-for-time lookups and the consumer's send-time check hold).
Events go out ordered by (ts, event_id). ``speedup`` paces them: 3600 publishes one hour of
event time per wall-clock second; 0 publishes as fast as the broker takes them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from streaming.events import Event, encode_event
from twotower.config import Settings, load_settings
from twotower.contracts import day_of_ms, raw_partition

log = logging.getLogger("streaming.replayer")

PROGRESS_EVERY_S = 10.0
DAY_MS = 86_400_000


@dataclass
class ReplayReport:
    events: int = 0
    first_ts: int | None = None
    last_ts: int | None = None
    seconds: float = 0.0


def parse_time(text: str) -> int:
    """``YYYY-MM-DD`` (midnight UTC), ISO datetime (UTC unless it says otherwise) or epoch ms -> epoch ms."""
    text = text.strip()
    if text.isdigit():
        return int(text)
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"not a date, ISO datetime or epoch milliseconds: {text!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return int(when.timestamp() * 1000)


def read_range(raw_dir: Path, start_ms: int, end_ms: int) -> pa.Table:
    """Raw events with ``start_ms <= ts < end_ms`` from the day partitions that overlap the range,
    sorted by (ts, event_id)."""
    tables = []
    day = day_of_ms(start_ms)
    last = day_of_ms(end_ms - 1)
    while day <= last:
        part = raw_partition(raw_dir, day)
        files = sorted(part.glob("*.parquet")) if part.is_dir() else []
        for f in files:
            t = pq.read_table(f, columns=["event_id", "user_id", "item_id", "event_type", "ts", "weight"])
            mask = pc.and_(pc.greater_equal(t["ts"], start_ms), pc.less(t["ts"], end_ms))
            tables.append(t.filter(mask))
        day += dt.timedelta(days=1)
    if not tables:
        return pa.table({"event_id": [], "user_id": [], "item_id": [], "event_type": [], "ts": pa.array([], pa.int64()), "weight": pa.array([], pa.float32())})
    return pa.concat_tables(tables).sort_by([("ts", "ascending"), ("event_id", "ascending")])


def iter_events(table: pa.Table) -> Iterator[Event]:
    cols = {name: table[name].to_pylist() for name in ("event_id", "user_id", "item_id", "event_type", "ts", "weight")}
    for i in range(table.num_rows):
        weight = cols["weight"][i]
        yield Event(cols["event_id"][i], cols["user_id"][i], cols["item_id"][i], cols["event_type"][i] or "interaction",
                    int(cols["ts"][i]), 1.0 if weight is None else float(weight))


def publish(producer, topic: str, events: Iterator[Event], speedup: float, sleep=time.sleep, clock=time.monotonic) -> ReplayReport:
    """Send events (in the given order) paced at ``speedup`` x event time; flushes at the end."""
    report = ReplayReport()
    t0 = clock()
    last_log = t0
    for ev in events:
        if report.first_ts is None:
            report.first_ts = ev.ts
        if speedup > 0:
            due = t0 + (ev.ts - report.first_ts) / 1000.0 / speedup
            wait = due - clock()
            if wait > 0:
                producer.flush()  # what is due goes out before we sleep
                sleep(wait)
        producer.send(topic, key=ev.user_id.encode(), value=encode_event(ev), timestamp_ms=ev.ts)
        report.events += 1
        report.last_ts = ev.ts
        if clock() - last_log >= PROGRESS_EVERY_S:
            last_log = clock()
            log.info("replayed %d events, event time now %s", report.events, _iso(ev.ts))
    producer.flush()
    report.seconds = round(clock() - t0, 3)
    return report


def replay(settings: Settings, start_ms: int, end_ms: int, speedup: float = 0.0, producer=None, topic: str | None = None) -> ReplayReport:
    """Publish raw events of ``[start_ms, end_ms)`` to ``topic`` (default: the input topic)."""
    from streaming.clients import make_producer

    if end_ms <= start_ms:
        raise ValueError(f"empty replay range: end {_iso(end_ms)} is not after start {_iso(start_ms)}")
    table = read_range(settings.paths.raw_dir, start_ms, end_ms)
    topic = topic or settings.kafka.topic
    log.info("replaying %d raw events from %s to %s into %s at speed-up %s", table.num_rows, _iso(start_ms), _iso(end_ms), topic, speedup or "max")
    own = producer is None
    producer = producer or make_producer(settings.kafka, linger_ms=20, batch_size=256 * 1024)
    try:
        report = publish(producer, topic, iter_events(table), speedup)
    finally:
        if own:
            producer.close()
    rate = report.events / report.seconds if report.seconds else float("inf")
    log.info("replay done: %d events (%s .. %s) in %.1fs (%.0f events/s)", report.events, _iso(report.first_ts), _iso(report.last_ts), report.seconds, rate)
    return report


def _iso(ms: int | None) -> str:
    if ms is None:
        return "-"
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m streaming.replayer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--start", required=True, help="YYYY-MM-DD, ISO datetime or epoch ms (inclusive)")
    parser.add_argument("--end", required=True, help="same forms (exclusive)")
    parser.add_argument("--speedup", type=float, default=0.0, help="event-time seconds per wall second; 0 = as fast as possible")
    parser.add_argument("--topic", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)
    report = replay(load_settings(), parse_time(args.start), parse_time(args.end), args.speedup, topic=args.topic)
    print(asdict(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

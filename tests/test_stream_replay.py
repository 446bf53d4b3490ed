"""Replayer (raw Parquet -> Kafka in event-time order) and archiver (Kafka -> raw Parquet by
day and hour, deduplicated), through the real broker on MovieLens-derived data."""

from __future__ import annotations

import datetime as dt
import shutil

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from jobs.status import status_json
from streaming.archiver import land_events, run_archiver
from streaming.events import Event
from streaming.replayer import parse_time, publish, read_range, replay
from tests.kafka_fixtures import kafka_broker, kafka_settings  # noqa: F401 - fixtures
from twotower.contracts import RAW_EVENT_SCHEMA, day_start_ms

pytestmark = [pytest.mark.kafka]


def test_parse_time_forms():
    assert parse_time("1998-03-01") == 888_710_400_000
    assert parse_time("1998-03-01T06:30:00") == 888_710_400_000 + 6.5 * 3_600_000
    assert parse_time("1998-03-01T06:30:00+01:00") == 888_710_400_000 + 5.5 * 3_600_000
    assert parse_time("888710400000") == 888_710_400_000
    with pytest.raises(ValueError, match="not a date"):
        parse_time("yesterday")


class FakeProducer:
    def __init__(self):
        self.sent = []

    def send(self, topic, key, value, timestamp_ms):
        self.sent.append((topic, key, timestamp_ms))

    def flush(self):
        pass


def test_publish_paces_event_time_at_the_speedup():
    now = [0.0]
    slept = []

    def sleep(s):
        slept.append(s)
        now[0] += s

    events = [Event(f"e{i}", "u1", "i1", "click", 1_000_000 + i * 600_000) for i in range(7)]  # 10 min apart
    producer = FakeProducer()
    report = publish(producer, "t", iter(events), speedup=600, sleep=sleep, clock=lambda: now[0])
    assert report.events == 7 and [s[2] for s in producer.sent] == [e.ts for e in events]
    assert sum(slept) == pytest.approx(6.0)  # 60 min of event time at 600x = 6 s
    fast = publish(FakeProducer(), "t", iter(events), speedup=0, sleep=sleep, clock=lambda: now[0])
    assert fast.events == 7 and sum(slept) == pytest.approx(6.0)  # no sleeping at 0


def last_days(raw_dir, n: int) -> list[dt.date]:
    days = sorted(p.name[3:] for p in raw_dir.glob("dt=*"))
    return [dt.date.fromisoformat(d) for d in days[-n:]]


def test_replay_then_archive_lands_exactly_the_replayed_events(kafka_settings, ml_small_raw_dir, tmp_path):
    days = last_days(ml_small_raw_dir, 3)
    start, end = day_start_ms(days[0]), day_start_ms(days[-1]) + 86_400_000
    source = read_range(ml_small_raw_dir, start, end)
    assert source.num_rows > 20

    src = kafka_settings.replace("paths", state_dir=tmp_path / "src")
    src.paths.state_dir.mkdir()
    src.paths.raw_dir.symlink_to(ml_small_raw_dir)
    report = replay(src, start, end, speedup=0)
    assert report.events == source.num_rows and report.first_ts == source["ts"][0].as_py()

    dst = kafka_settings.replace("paths", state_dir=tmp_path / "dst")
    landed_report = run_archiver(dst, "bounded")
    assert landed_report["status"] == "ok" and landed_report["events_written"] == source.num_rows
    assert landed_report["invalid"] == 0

    files = sorted(dst.paths.raw_dir.glob("dt=*/part-h*.parquet"))
    landed = pq.read_table([str(f) for f in files]) if files else None
    for f in files:  # one file per hour, every row in its own hour and day
        t = pq.read_table(f)
        assert t.schema.equals(RAW_EVENT_SCHEMA)
        assert set(t["hour"].to_pylist()) == {int(f.stem[-2:])}
        assert f.parent.name == f"dt={dt.datetime.fromtimestamp(t['ts'][0].as_py() / 1000, tz=dt.timezone.utc).date()}"
    key = [("event_id", "ascending")]
    got = landed.select(["event_id", "user_id", "item_id", "event_type", "ts", "weight"]).sort_by(key)
    want = source.sort_by(key)
    assert got.to_pylist() == want.to_pylist()
    newest = dt.datetime.fromtimestamp(max(source["ts"].to_pylist()) / 1000, tz=dt.timezone.utc).isoformat(timespec="milliseconds")
    status = status_json(dst)["archive"]  # what `make status` shows
    assert status["events_written"] == source.num_rows and status["newest_event"] == newest.replace("+00:00", "Z")
    assert status["landed_at"] is not None and status["landed_at"] <= status["checked_at"]

    # the same records read again (a new group, as after a crash before the commit) add nothing
    again = run_archiver(dst.replace("kafka", archiver_group_id=dst.kafka.archiver_group_id + "-2"), "bounded")
    assert again["events_written"] == 0 and again["duplicates_skipped"] == source.num_rows
    assert sorted(dst.paths.raw_dir.glob("dt=*/part-h*.parquet")) == files
    later = status_json(dst)["archive"]
    assert later["events_written"] == 0 and later["duplicates_skipped"] == source.num_rows and later["newest_event"] == status["newest_event"]


def test_landing_merges_with_a_day_the_batch_ingest_wrote(ml_small_raw_dir, tmp_path):
    day = last_days(ml_small_raw_dir, 1)[0]
    raw = tmp_path / "raw"
    shutil.copytree(ml_small_raw_dir / f"dt={day}", raw / f"dt={day}")
    existing = pq.read_table(raw / f"dt={day}")
    row = existing.slice(0, 1).to_pylist()[0]
    old = Event(row["event_id"], row["user_id"], row["item_id"], row["event_type"], row["ts"], row["weight"])
    new = Event("stream-1", "u-new", "i-new", "click", day_start_ms(day) + 5 * 3_600_000 + 7, 1.0)
    counts = land_events(raw, [old, new, new])
    assert counts == {"written": 1, "duplicates": 2, "files": 1}
    merged = pq.read_table(raw / f"dt={day}")
    assert merged.num_rows == existing.num_rows + 1
    assert pc.count_distinct(merged["event_id"]).as_py() == merged.num_rows
    assert pq.read_table(raw / f"dt={day}" / "part-h05.parquet")["event_id"].to_pylist() == ["stream-1"]


def _land_rounds(raw: str, worker: int, rounds: int, day_ms: int, start) -> None:
    """One archiver process: ``rounds`` landings of its own events into the same hour file, begun
    when every process is ready (``start``, a barrier: spawned processes import at different speeds)."""
    from pathlib import Path

    start.wait(timeout=60)
    for r in range(rounds):
        events = [Event(f"w{worker}-r{r}-{k}", f"u{worker}", "i1", "click", day_ms + 5 * 3_600_000 + k, 1.0) for k in range(3)]
        land_events(Path(raw), events)


@pytest.mark.slow
def test_archivers_landing_the_same_hour_at_once_lose_nothing(tmp_path):
    """Four archiver processes (members of one group after a rebalance, or an hourly run beside a
    continuous one) land events of the same hour at the same time: every event is in the hour's
    file once. Without the day lock each merges into the file as it read it and the later rename
    drops the others' events."""
    import multiprocessing

    day = dt.date(1998, 3, 1)
    workers, rounds = 4, 20
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(workers)
    procs = [ctx.Process(target=_land_rounds, args=(str(tmp_path), w, rounds, day_start_ms(day), start)) for w in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * workers
    ids = pq.read_table(tmp_path / f"dt={day}" / "part-h05.parquet")["event_id"].to_pylist()
    assert len(ids) == len(set(ids)) == workers * rounds * 3

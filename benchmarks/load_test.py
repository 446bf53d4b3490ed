"""Sustained load: a fixed input rate for minutes into the continuous consumer, with memory
sampled and every event accounted for (issue 7's load bar).

    python -m benchmarks.load_test [--rate 5000] [--minutes 10] [--malformed 0.005]

What runs, all real: the local broker, Redis, and ``python -m streaming.consumer --mode
continuous`` as its own process, updating a published benchmark version
(benchmarks.bench_version: 50k users, 5k items, the product's TwoTower at seeded weights). A
producer thread sends ``rate`` events/s keyed by user (Zipf-like user activity, uniform items)
with event time running 360x faster than the wall clock (an event-time hour closes every ~10 s,
so the consumer applies hours all along), plus a ``malformed`` share of bad records of several
kinds. Every 5 s the consumer's RSS (psutil) and lag (its Redis ``lag`` hash) are sampled.
After ``minutes`` the producer stops, sends one event per partition an hour and a half ahead
(closing every hour still open), waits for the consumer to apply them and SIGTERMs it.

Accounting, from the consumer's final report and the dead-letter topic:
    records read       == records produced
    dead letters       == malformed records produced == records on the dead-letter topic
    events in applied hours + events still buffered + late events == valid records produced
Memory is "flat" when the median RSS of the last minute is within 10% of the median of the
minute after warm-up (the second minute). Results go to benchmarks/out/load_test.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.limits_common import drop_prefix, write_result
from benchmarks.stream_throughput import OUT, machine
from twotower.config import Settings, load_settings
from twotower.logs import setup_logging

log = logging.getLogger("benchmarks.load_test")

SPEEDUP = 360.0
"""Event-time seconds per wall-clock second."""
SAMPLE_EVERY_S = 5.0
MALFORMED = (
    b"not json at all",
    b'{"event_id": "x", "user_id": "u1"}',  # missing fields
    b'{"event_id": 7, "user_id": "u1", "item_id": "i1", "event_type": "click", "ts": 1}',  # mistyped id
    b"[1, 2, 3]",  # not an object
    b'{"event_id": "e", "user_id": "u1", "item_id": "i1", "event_type": "click", "ts": "yesterday"}',
    b'{"event_id": "e", "user_id": "u1", "item_id": "i1", "event_type": "click", "ts": 1, "weight": -3}',
)


class Producer(threading.Thread):
    """Sends ``rate`` records/s (valid and malformed) until stopped; counts what it sent."""

    def __init__(self, settings: Settings, rate: int, malformed: float, n_users: int, n_items: int, start_ms: int):
        super().__init__(daemon=True, name="load-producer")
        from streaming.clients import make_producer

        self.s, self.rate, self.malformed = settings, rate, malformed
        self.n_users, self.n_items, self.start_ms = n_users, n_items, start_ms
        self.producer = make_producer(settings.kafka, linger_ms=20, batch_size=256 * 1024)
        self.stop = threading.Event()
        self.valid = self.bad = 0
        self.last_ts = start_ms
        self.behind_s = 0.0

    def run(self) -> None:
        from streaming.events import Event, encode_event

        rng = np.random.default_rng(3)
        t0 = time.monotonic()
        tick = 0.1
        n = 0
        while not self.stop.is_set():
            due = int((time.monotonic() - t0) * self.rate)
            if due <= n:
                time.sleep(tick / 4)
                continue
            count = min(due - n, self.rate)  # catch up at most one second's worth at once
            users = np.minimum(rng.zipf(1.3, count), self.n_users)
            items = rng.integers(1, self.n_items + 1, count)
            bad = rng.random(count) < self.malformed
            now_ms = self.start_ms + int((time.monotonic() - t0) * SPEEDUP * 1000)
            for k in range(count):
                key = f"u{users[k]}".encode()
                if bad[k]:
                    value = MALFORMED[(self.bad) % len(MALFORMED)]
                    self.bad += 1
                else:
                    ev = Event(f"load-{n + k}", f"u{users[k]}", f"i{items[k]}", "click", now_ms, 1.0)
                    value = encode_event(ev)
                    self.valid += 1
                self.producer.send(self.s.kafka.topic, key=key, value=value, timestamp_ms=now_ms)
            self.last_ts = now_ms
            n += count
            self.behind_s = max(self.behind_s, (due - n) / self.rate)
        self.producer.flush()

    def close_all_hours(self, partitions: int) -> None:
        """One event per partition 1.5 h of event time after the last one (closes every open hour)."""
        from kafka.partitioner import DefaultPartitioner  # noqa: F401 - the keys below spread over partitions
        from streaming.events import Event, encode_event

        ts = self.last_ts + 90 * 60 * 1000
        sent_to: set[int] = set()
        k = 0
        while len(sent_to) < partitions and k < 10_000:
            uid = f"u{k + 1}"
            future = self.producer.send(self.s.kafka.topic, key=uid.encode(), timestamp_ms=ts,
                                        value=encode_event(Event(f"load-close-{k}", uid, "i1", "click", ts, 1.0)))
            self.valid += 1
            sent_to.add(future.get(timeout=30).partition)
            k += 1
        self.producer.flush()


def consumer_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "TT_REDIS_PREFIX": settings.redis.prefix,
        "TT_KAFKA_TOPIC": settings.kafka.topic,
        "TT_KAFKA_DEAD_LETTER_TOPIC": settings.kafka.dead_letter_topic,
        "TT_KAFKA_GROUP_ID": settings.kafka.group_id,
        "TT_KAFKA_SESSION_TIMEOUT_MS": str(settings.kafka.session_timeout_ms),
        "TT_STATE_DIR": str(settings.paths.state_dir),
        "TT_INCREMENTAL_CHECKPOINT_INTERVAL_S": "5",
    })  # fmt: skip
    return env


def count_topic(settings: Settings, topic: str) -> int:
    from kafka import TopicPartition

    from streaming.clients import make_consumer

    consumer = make_consumer(settings.kafka, group_id=None)
    parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or []]
    consumer.assign(parts)
    consumer.seek_to_beginning()
    n, idle = 0, 0
    while idle < 4:
        got = sum(len(v) for v in consumer.poll(timeout_ms=500).values())
        n += got
        idle = idle + 1 if got == 0 else 0
    consumer.close()
    return n


def run(rate: int = 5000, minutes: float = 10.0, malformed: float = 0.005, n_users: int = 50_000, n_items: int = 5_000) -> dict[str, Any]:
    import psutil

    from benchmarks.bench_version import publish_bench_version
    from infra.kafka_topics import ensure_topics
    from jobs.redis_conn import redis_client
    from streaming.clients import make_admin
    from streaming.state import StreamState

    tag = uuid.uuid4().hex[:8]
    state_dir = OUT / f"state-load-{tag}"
    s = load_settings().replace("paths", state_dir=state_dir).replace("redis", prefix=f"tt-load-{tag}")
    s = s.replace("kafka", topic=f"load-{tag}", dead_letter_topic=f"load-{tag}.dlq", group_id=f"load-{tag}", session_timeout_ms=6000)
    cutoff_day = dt.date(2024, 1, 1)
    client = redis_client(s)
    proc = None
    samples: list[dict[str, float]] = []
    try:
        publish_bench_version(s, n_users, n_items, cutoff_day, write_rows=False)
        admin = make_admin(s.kafka)
        ensure_topics(admin, [(s.kafka.topic, s.kafka.partitions), (s.kafka.dead_letter_topic, s.kafka.partitions)])
        admin.close()
        log_path = state_dir / "consumer.log"
        proc = subprocess.Popen([sys.executable, "-m", "streaming.consumer", "--mode", "continuous"], env=consumer_env(s),
                                stdout=subprocess.PIPE, stderr=open(log_path, "wb"), cwd=Path(__file__).resolve().parents[1])  # fmt: skip
        child = psutil.Process(proc.pid)
        start_ms = int(dt.datetime(2024, 1, 2, tzinfo=dt.timezone.utc).timestamp() * 1000)
        producer = Producer(s, rate, malformed, n_users, n_items, start_ms)
        state = StreamState(client, s.redis.prefix)
        t0 = time.monotonic()
        producer.start()
        log.info("producing %d events/s for %.1f min into %s (%s)", rate, minutes, s.kafka.topic, s.redis.prefix)
        while time.monotonic() - t0 < minutes * 60:
            time.sleep(SAMPLE_EVERY_S)
            lag = {int(k): int(v) for k, v in client.hgetall(state.key("lag")).items()}
            sample = {"t_s": round(time.monotonic() - t0, 1), "rss_mb": round(child.memory_info().rss / 2**20, 1),
                      "lag": sum(lag.values()), "produced": producer.valid + producer.bad}  # fmt: skip
            samples.append(sample)
            log.info("t=%5.0fs produced %d, consumer lag %d, RSS %.0f MB", sample["t_s"], sample["produced"], sample["lag"], sample["rss_mb"])
        producer.stop.set()
        producer.join()
        produce_s = time.monotonic() - t0
        producer.close_all_hours(s.kafka.partitions)
        produced_valid, produced_bad = producer.valid, producer.bad
        deadline = time.monotonic() + 600
        drained_at = None
        while time.monotonic() < deadline:
            time.sleep(2.0)
            lag = sum(int(v) for v in client.hgetall(state.key("lag")).values())
            last = client.hget(state.key("status"), "last_window")
            if lag == 0 and last is not None and int(last) >= producer.last_ts - producer.last_ts % 3_600_000 - 3_600_000:
                drained_at = time.monotonic() - t0
                break
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
        report = json.loads(out.decode().strip().splitlines()[-1])
        dlq = count_topic(s, s.kafka.dead_letter_topic)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        drop_prefix(client, s.redis.prefix)
        client.close()
    accounted = report["events_in_hours"] + report["events_open"] + report["late_events"]
    rss = [x["rss_mb"] for x in samples]
    per_min = max(1, int(60 / SAMPLE_EVERY_S))
    warm = rss[per_min : 2 * per_min] or rss[:per_min]
    last = rss[-per_min:]
    return {
        "benchmark": "load_test",
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.load_test", *sys.argv[1:]]),
        "measured_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "target_rate": rate,
        "minutes": minutes,
        "achieved_input_rate": round((produced_valid + produced_bad) / produce_s),
        "producer_max_behind_s": round(producer.behind_s, 2),
        "drained_after_s": round(drained_at, 1) if drained_at else None,
        "max_lag": max((x["lag"] for x in samples), default=None),
        "accounting": {
            "produced": produced_valid + produced_bad,
            "produced_valid": produced_valid,
            "produced_malformed": produced_bad,
            "records_read": report["records_read"],
            "events_in_applied_hours": report["events_in_hours"],
            "events_still_buffered": report["events_open"],
            "late_events": report["late_events"],
            "dead_letters": report["dead_letters"],
            "dead_letter_topic_records": dlq,
            "events_lost": produced_valid - accounted,
            "exact": report["records_read"] == produced_valid + produced_bad and accounted == produced_valid
            and report["dead_letters"] == produced_bad == dlq,
        },
        "rss_mb": {"second_minute_median": round(statistics.median(warm), 1) if warm else None,
                   "last_minute_median": round(statistics.median(last), 1) if last else None, "max": max(rss, default=None)},  # fmt: skip
        "memory_flat": bool(warm and last and statistics.median(last) <= 1.1 * statistics.median(warm)),
        "hours_applied": report["hours_applied"],
        "user_cache": report.get("cached_users") or {},
        "cache_users_limit": s.incremental.cache_users,
        "samples": samples,
    }


def render(result: dict[str, Any]) -> list[str]:
    a, m = result["accounting"], result["rss_mb"]
    lines = [
        f"{result['target_rate']} events/s for {result['minutes']} min into the continuous consumer "
        f"(achieved input {result['achieved_input_rate']} events/s; max consumer lag {result['max_lag']} records; "
        f"drained {result['drained_after_s']} s after the start).",
        "",
        "| produced | valid | malformed | read | in applied hours | still buffered | late | dead letters (report / topic) | lost |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {a['produced']} | {a['produced_valid']} | {a['produced_malformed']} | {a['records_read']} | {a['events_in_applied_hours']} "
        f"| {a['events_still_buffered']} | {a['late_events']} | {a['dead_letters']} / {a['dead_letter_topic_records']} | {a['events_lost']} |",
        "",
        f"Exact accounting: **{a['exact']}**. Consumer RSS: {m['second_minute_median']} MB (median, 2nd minute) -> "
        f"{m['last_minute_median']} MB (median, last minute), max {m['max']} MB; flat (within 10%): **{result['memory_flat']}**.",
    ]
    cache = result.get("user_cache") or {}
    if cache:
        lines.append(
            f"The consumer's user cache (streaming.user_cache) held {cache.get('size'):,} users at the end, of at most "
            f"{result.get('cache_users_limit', 0):,}: it grows with the distinct users seen (Zipf-like activity keeps adding "
            "new ones) until that bound, so part of any growth above is the cache filling, not a leak."
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.load_test", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=int, default=5000, help="input events per second")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--malformed", type=float, default=0.005, help="share of malformed records")
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.minutes <= 0 or not 0 <= args.malformed < 1:
        parser.error("--rate and --minutes must be positive and --malformed in [0, 1)")
    setup_logging()
    result = run(args.rate, args.minutes, args.malformed)
    write_result(result)
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Incremental consumer throughput beside the raw consume rate of the same client, in one run.

    python -m benchmarks.stream_throughput [--events 100000] [--days 10]

Everything goes through the product's own code on seeded synthetic data (jobs.synthetic:
power-law popularity, clustered and drifting tastes): ingest -> nightly retrain and publish
(1 epoch: model quality does not change the update cost) -> replay of the days after the cutoff
into a fresh topic -> (1) the raw consume rate: a kafka-python consumer reading every record of
that topic and doing nothing else; (2) the end-to-end rate: the incremental consumer in bounded
mode, from Kafka to user rows in Redis. Reported: events/s of each and their ratio (the issue's
target is >= 0.5). Results go to benchmarks/out/stream_throughput.json with the machine and the
command. A benchmark reports; it never fails on speed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import shutil
import sys
import time
import uuid
from contextlib import closing
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks.limits_common import drop_prefix, write_result
from jobs.redis_conn import redis_client
from twotower.config import Settings, load_settings
from twotower.logs import setup_logging

log = logging.getLogger("benchmarks.stream_throughput")
OUT = Path(__file__).resolve().parent / "out"


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}


def raw_consume_rate(settings: Settings, topic: str, expected: int) -> tuple[int, float, float]:
    """Read every record of ``topic`` with a plain kafka-python consumer; (records, wall s, CPU s)."""
    from streaming.clients import make_consumer

    consumer = make_consumer(settings.kafka, group_id=None)
    partitions = [p for p in consumer.partitions_for_topic(topic) or []]
    from kafka import TopicPartition

    consumer.assign([TopicPartition(topic, p) for p in partitions])
    consumer.seek_to_beginning()
    n, t0, c0, idle_since = 0, time.perf_counter(), time.process_time(), None
    while n < expected:
        batch = consumer.poll(timeout_ms=500, max_records=5000)
        got = sum(len(v) for v in batch.values())
        n += got
        if got == 0:
            idle_since = idle_since or time.perf_counter()
            if time.perf_counter() - idle_since > 10:
                break  # the topic holds fewer records than expected; report what was read
        else:
            idle_since = None
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    consumer.close()
    return n, seconds, cpu


def run(n_events: int = 100_000, days: int = 10) -> dict[str, Any]:
    """Build a published version on synthetic data, replay, and measure both rates."""
    from infra.kafka_topics import ensure_topics
    from jobs.ingest import ingest_synthetic
    from jobs.nightly import run_nightly
    from jobs.synthetic import SyntheticSpec
    from streaming.clients import make_admin
    from streaming.consumer import run_bounded
    from streaming.replayer import replay
    from twotower.contracts import day_start_ms

    tag = uuid.uuid4().hex[:8]
    state = OUT / f"state-stream-{tag}"
    settings = load_settings().replace("paths", state_dir=state).replace("redis", prefix=f"tt-bench-{tag}")
    settings = settings.replace(
        "kafka", topic=f"bench-{tag}", dead_letter_topic=f"bench-{tag}.dlq", group_id=f"bench-{tag}", session_timeout_ms=3000
    )
    settings = settings.replace("train", epochs=1)
    spec = SyntheticSpec(n_users=5000, n_items=2000, n_events=n_events, days=days + 5, seed=11)
    try:
        ingest_synthetic(settings.paths.raw_dir, spec)
        cutoff_day = spec.end_day - dt.timedelta(days=days)
        nightly = run_nightly(settings, cutoff_day)
        admin = make_admin(settings.kafka)
        ensure_topics(admin, [(settings.kafka.topic, settings.kafka.partitions), (settings.kafka.dead_letter_topic, settings.kafka.partitions)])
        admin.close()
        start_ms = day_start_ms(cutoff_day + dt.timedelta(days=1))
        rep = replay(settings, start_ms, day_start_ms(spec.end_day + dt.timedelta(days=1)))
        raw_n, raw_s, raw_cpu = raw_consume_rate(settings, settings.kafka.topic, rep.events)
        t0, c0 = time.perf_counter(), time.process_time()
        report = run_bounded(settings)
        e2e_s, e2e_cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        shutil.rmtree(state, ignore_errors=True)
        with closing(redis_client(settings)) as client:
            drop_prefix(client, settings.redis.prefix)
    raw_rate = raw_n / raw_s if raw_s else float("nan")
    e2e_rate = report["records_read"] / e2e_s if e2e_s else float("nan")
    return {
        "benchmark": "stream_throughput",
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.stream_throughput", *sys.argv[1:]]),
        "measured_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "events_replayed": rep.events,
        "version": nightly.version,
        "workload": {
            "spec": asdict(spec) | {"end_day": spec.end_day.isoformat()},
            "replayed_days": days,
            "events_per_user_hour": round(report["events_applied"] / max(1, report["users_updated"]), 2),
            "negatives": settings.incremental.negatives,
            "steps": settings.incremental.steps,
            "torch_threads": settings.incremental.threads,
        },
        "raw_consume": {"records": raw_n, "seconds": round(raw_s, 2), "cpu_seconds": round(raw_cpu, 2), "events_per_s": round(raw_rate)},
        "end_to_end": {
            "records_read": report["records_read"],
            "hours_applied": report["hours_applied"],
            "users_updated": report["users_updated"],
            "events_applied": report["events_applied"],
            "seconds": round(e2e_s, 2),
            "cpu_seconds": round(e2e_cpu, 2),
            "events_per_s": round(e2e_rate),
        },
        "cpu_ratio_raw_to_end_to_end": round(raw_cpu / e2e_cpu, 3) if e2e_cpu else None,
        "ratio_end_to_end_to_raw": round(e2e_rate / raw_rate, 3) if raw_rate else None,
        "target_ratio": 0.5,
    }


def render(result: dict[str, Any]) -> list[str]:
    """RESULTS.md section (see benchmarks.run)."""
    raw, e2e, w = result["raw_consume"], result["end_to_end"], result.get("workload", {})
    spec = w.get("spec", {})
    return [
        f"Synthetic stream ({spec.get('n_users', '?')} users, {spec.get('n_items', '?')} items, seed {spec.get('seed', '?')}): "
        f"{result['events_replayed']} events over {w.get('replayed_days', '?')} replayed days, "
        f"{w.get('events_per_user_hour', '?')} events per user-hour; update: {w.get('steps', '?')} steps, "
        f"{w.get('negatives', '?')} sampled negatives, {w.get('torch_threads', '?')} torch thread(s).",
        "",
        "| path | records | wall s | CPU s | events/s |",
        "|---|---|---|---|---|",
        f"| raw kafka-python consume (same client settings, same topic) | {raw['records']} | {raw['seconds']} | {raw.get('cpu_seconds', '-')} | {raw['events_per_s']} |",
        f"| end to end: incremental consumer, bounded mode, Kafka -> user rows in Redis | {e2e['records_read']} | {e2e['seconds']} | {e2e.get('cpu_seconds', '-')} | {e2e['events_per_s']} |",
        "",
        f"End-to-end / raw events/s: **{result['ratio_end_to_end_to_raw']}** (target {result['target_ratio']}); "
        f"{e2e['hours_applied']} hours applied, {e2e['users_updated']} user rows updated.",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.stream_throughput", description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--days", type=int, default=10, help="days after the cutoff that are replayed")
    args = parser.parse_args(argv)
    setup_logging()
    result = run(args.events, args.days)
    write_result(result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

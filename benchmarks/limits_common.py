"""Shared plumbing of the "throughput and limits" benchmarks (issue 6): result header and file,
a unique scratch deployment (Redis prefix, Kafka topic, state dir) per run, percentiles, and a
cache directory keyed by a spec so that expensive inputs (raw events, a 1M-item index) are built
once and reused by the next run with the same spec.

Each benchmark module calls ``header(name)`` for the common fields, adds its numbers, and
``write_result`` puts it at ``benchmarks/out/<name>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import logging
import shutil
import sys
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from twotower.config import Settings

OUT = Path(__file__).resolve().parent / "out"


def header(name: str, argv: list[str] | None = None) -> dict[str, Any]:
    """The fields every result carries: benchmark, command, measured_at (UTC), machine."""
    from benchmarks.stream_throughput import machine

    args = sys.argv[1:] if argv is None else argv
    return {
        "benchmark": name,
        "command": " ".join(["python", "-m", f"benchmarks.{name}", *args]),
        "measured_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
    }


def write_result(result: dict[str, Any], out: Path | None = None) -> Path:
    """Write ``result`` as JSON to ``out`` (default ``benchmarks/out/<benchmark>.json``)."""
    path = out or OUT / f"{result['benchmark']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, sort_keys=True, default=str) + "\n")
    return path


def spec_key(spec: dict[str, Any]) -> str:
    """Short stable hash of a JSON-able spec (cache directory names)."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]


def cache_dir(kind: str, spec: dict[str, Any]) -> Path:
    """``benchmarks/out/cache/<kind>-<hash of spec>``: one directory per distinct input."""
    return OUT / "cache" / f"{kind}-{spec_key(spec)}"


def percentiles(values: list[float] | np.ndarray, digits: int = 2) -> dict[str, float | int | None]:
    """p50/p90/p99/max/mean and the count of ``values`` (None when empty)."""
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return {"n": 0, "p50": None, "p90": None, "p99": None, "max": None, "mean": None}
    q = np.percentile(a, [50, 90, 99])
    return {"n": int(a.size), "p50": round(float(q[0]), digits), "p90": round(float(q[1]), digits),
            "p99": round(float(q[2]), digits), "max": round(float(a.max()), digits), "mean": round(float(a.mean()), digits)}  # fmt: skip


def fmt(x: Any, digits: int = 0) -> str:
    """A number for a markdown table: thousands separators, ``-`` for None."""
    if x is None:
        return "-"
    if isinstance(x, (int, np.integer)) or digits == 0:
        return f"{round(float(x)):,}"
    return f"{float(x):,.{digits}f}"


def drop_prefix(client, prefix: str) -> int:
    """Delete every Redis key under ``prefix:``; returns how many."""
    n = 0
    batch: list[bytes] = []
    for key in client.scan_iter(match=f"{prefix}:*", count=5000):
        batch.append(key)
        if len(batch) >= 5000:
            n += client.unlink(*batch)
            batch.clear()
    if batch:
        n += client.unlink(*batch)
    return n


@contextmanager
def scratch_deployment(base: Settings, name: str, kafka: bool = False) -> Iterator[Settings]:
    """Settings with a unique Redis prefix, state dir under benchmarks/out and (``kafka``) unique
    topics and group; everything is removed on exit (Redis keys, state dir, topics)."""
    from jobs.redis_conn import redis_client

    tag = f"{name}-{uuid.uuid4().hex[:8]}"
    state = OUT / f"state-{tag}"
    s = base.replace("paths", state_dir=state).replace("redis", prefix=f"tt-bench-{tag}")
    topics: list[str] = []
    if kafka:
        s = s.replace("kafka", topic=f"bench-{tag}", dead_letter_topic=f"bench-{tag}.dlq", group_id=f"bench-{tag}",
                      session_timeout_ms=6000)  # fmt: skip
        topics = [s.kafka.topic, s.kafka.dead_letter_topic]
        from infra.kafka_topics import ensure_topics
        from streaming.clients import make_admin

        admin = make_admin(s.kafka)
        try:
            ensure_topics(admin, [(t, s.kafka.partitions) for t in topics])
        finally:
            admin.close()
    try:
        yield s
    finally:
        client = redis_client(s)
        try:
            drop_prefix(client, s.redis.prefix)
        finally:
            client.close()
        shutil.rmtree(state, ignore_errors=True)
        if topics:
            _delete_topics(s, topics)


def _delete_topics(s: Settings, topics: list[str]) -> None:
    from streaming.clients import make_admin

    admin = make_admin(s.kafka)
    try:
        admin.delete_topics(topics)
    except Exception:  # noqa: BLE001 - a broker that cannot delete keeps an empty scratch topic; harmless
        pass
    finally:
        admin.close()


def cli(name: str, doc: str, add_args: Callable[[argparse.ArgumentParser], None],
        run: Callable[[argparse.Namespace, list[str]], dict[str, Any]], render: Callable[[dict[str, Any]], list[str]],
        argv: list[str] | None = None) -> int:  # fmt: skip
    """The shared ``main``: parse ``python -m benchmarks.<name>`` arguments, run, write the JSON,
    print the rendered section. ``run(args, argv)`` gets the argv to record as the command."""
    from twotower.logs import setup_logging

    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}", description=doc.split("\n\n")[0])
    add_args(parser)
    args = parser.parse_args(argv)
    setup_logging()
    logging.getLogger("kafka").setLevel(logging.WARNING)
    result = run(args, sys.argv[1:] if argv is None else argv)
    path = write_result(result)
    print("\n".join(render(result)))
    print(f"written to {path}")
    return 0

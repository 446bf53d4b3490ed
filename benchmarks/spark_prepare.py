"""Spark prepare throughput: events/s of the product's prepare job (jobs.prepare.run_prepare) on
seeded synthetic events with realistic structure.

    python -m benchmarks.spark_prepare [--events 10000000] [--users 200000] [--items 50000] [--days 30]

Input: jobs.synthetic (power-law item popularity, users mixing 1-3 taste clusters, drift)
written by the product's own ingest (jobs.ingest.ingest_synthetic: normalise, raw day
partitions, attribute tables). Generating 10M events takes minutes by itself, so it is timed
separately and the raw data is kept under ``benchmarks/out/cache/spark-raw-<hash of spec>/``;
a later run with the same spec reuses it (the result says so and carries the generation time
measured when it was made).

Measured: a Spark session is started first (``spark.master`` from the settings, ``local[*]`` by
default; its start-up is reported apart), then ``run_prepare`` for the last day of the data with
a window covering every day: read, dedup, vocabularies, examples with the last-L history,
train/eval split, histories, item frequencies, written and committed. ``events_per_s`` is the
raw events read divided by the wall time of that call alone. Rows out come from the prepared
partition's manifest. The prepared output is deleted afterwards.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import logging
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from benchmarks.limits_common import OUT, cache_dir, cli, fmt, header
from twotower.config import Settings, load_settings

log = logging.getLogger("benchmarks.spark_prepare")

NAME = "spark_prepare"
GENERATION_FILE = "generation.json"
"""Written last into a raw cache directory: its presence marks the data complete."""


def synthetic_spec(n_events: int, n_users: int, n_items: int, days: int, seed: int = 7):
    from jobs.synthetic import SyntheticSpec

    return SyntheticSpec(n_users=n_users, n_items=n_items, n_events=n_events, days=days,
                         n_clusters=max(20, n_items // 500), seed=seed)  # fmt: skip


def ensure_raw(spec) -> tuple[Path, dict[str, Any]]:
    """(state dir whose ``raw/`` holds the spec's events, generation facts); generates once."""
    from jobs.ingest import ingest_synthetic

    spec_dict = {k: str(v) for k, v in dataclasses.asdict(spec).items()}
    root = cache_dir("spark-raw", spec_dict)
    marker = root / GENERATION_FILE
    if marker.exists():
        facts = json.loads(marker.read_text())
        log.info("reusing %d synthetic events generated %s in %.1f s (%s)", spec.n_events, facts["generated_at"], facts["seconds"], root)
        return root, {**facts, "reused": True}
    shutil.rmtree(root, ignore_errors=True)
    log.info("generating %d synthetic events (%d users, %d items, %d days) into %s", spec.n_events, spec.n_users, spec.n_items, spec.days, root)
    t0 = time.perf_counter()
    report = ingest_synthetic(root / "raw", spec)
    seconds = time.perf_counter() - t0
    raw_bytes = sum(p.stat().st_size for p in (root / "raw").rglob("*.parquet"))
    facts = {
        "spec": spec_dict,
        "seconds": round(seconds, 2),
        "events_per_s": round(spec.n_events / seconds),
        "raw_days": len(report.days),
        "raw_bytes": raw_bytes,
        "generated_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    marker.write_text(json.dumps(facts, indent=2, sort_keys=True) + "\n")
    return root, {**facts, "reused": False}


def run(n_events: int = 10_000_000, n_users: int = 200_000, n_items: int = 50_000, days: int = 30,
        settings: Settings | None = None, argv: list[str] | None = None) -> dict[str, Any]:  # fmt: skip
    """Generate (or reuse) the input, then time the prepare stage alone; returns the result dict."""
    from jobs.spark import get_spark

    base = settings or load_settings()
    spec = synthetic_spec(n_events, n_users, n_items, days)
    raw_root, generation = ensure_raw(spec)
    scratch = OUT / f"state-{NAME}-{uuid.uuid4().hex[:8]}"
    scratch.mkdir(parents=True)
    (scratch / "raw").symlink_to((raw_root / "raw").resolve(), target_is_directory=True)
    s = base.replace("paths", state_dir=scratch).replace("prepare", window_days=days)
    try:
        t0 = time.perf_counter()
        spark = get_spark(s.spark, app_name="bench-spark-prepare")
        session_s = time.perf_counter() - t0
        from jobs.prepare import run_prepare

        t1 = time.perf_counter()
        partition = run_prepare(s, spec.end_day, spark=spark)
        prepare_s = time.perf_counter() - t1
        manifest = json.loads((partition / "manifest.json").read_text())
        out_bytes = sum(p.stat().st_size for p in partition.rglob("*.parquet"))
        cores = spark.sparkContext.defaultParallelism
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {
        **header(NAME, argv),
        "input": {"generator": "jobs.synthetic via jobs.ingest.ingest_synthetic", **generation["spec"],
                  "raw_days": generation["raw_days"], "raw_bytes": generation["raw_bytes"]},  # fmt: skip
        "generation": {k: generation[k] for k in ("seconds", "events_per_s", "generated_at", "reused")},
        "spark": {"master": s.spark.master, "default_parallelism": cores, "driver_memory": s.spark.driver_memory,
                  "shuffle_partitions": s.spark.shuffle_partitions, "session_start_s": round(session_s, 2)},  # fmt: skip
        "prepare": {
            "events_in": n_events,
            "events_after_dedup": manifest["n_events"],
            "seconds": round(prepare_s, 2),
            "events_per_s": round(n_events / prepare_s),
            "rows_out": {k: manifest[k] for k in ("n_train", "n_eval", "n_users", "n_items")},
            "output_bytes": out_bytes,
            "history_len": manifest["history_len"],
        },
    }


def render(result: dict[str, Any]) -> list[str]:
    """Markdown lines of the Spark prepare section."""
    p, g, sp, i = result["prepare"], result["generation"], result["spark"], result["input"]
    reused = f"reused from {g['generated_at']}" if g["reused"] else "generated in this run"
    return [
        f"Spark `{sp['master']}` ({sp['default_parallelism']} cores, driver {sp['driver_memory']}); the prepare row is "
        "`jobs.prepare.run_prepare` alone, timed after the session is up.",
        "",
        "| stage | events | wall time (s) | events/s | rows out |",
        "|---|---|---|---|---|",
        f"| synthetic generation + ingest ({reused}) | {fmt(i['n_events'])} | {fmt(g['seconds'], 1)} | {fmt(g['events_per_s'])} | "
        f"{i['raw_days']} raw day partitions, {fmt(i['raw_bytes'] / 2**20, 1)} MiB |",
        f"| Spark session start | - | {fmt(sp['session_start_s'], 1)} | - | - |",
        f"| **prepare** (jobs.prepare.run_prepare, window {i['days']} days, L={p['history_len']}) | {fmt(p['events_in'])} | "
        f"{fmt(p['seconds'], 1)} | **{fmt(p['events_per_s'])}** | {fmt(p['rows_out']['n_train'])} train + {fmt(p['rows_out']['n_eval'])} eval "
        f"examples; {fmt(p['rows_out']['n_users'])} users, {fmt(p['rows_out']['n_items'])} items; {fmt(p['output_bytes'] / 2**20, 1)} MiB |",
        "",
        f"Input: {fmt(i['n_users'])} users, {fmt(i['n_items'])} items, {i['n_clusters']} taste clusters, Zipf {i['zipf_a']}, seed {i['seed']}.",
        "",
    ]


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--events", type=int, default=10_000_000)
    p.add_argument("--users", type=int, default=200_000)
    p.add_argument("--items", type=int, default=50_000)
    p.add_argument("--days", type=int, default=30)


def main(argv: list[str] | None = None) -> int:
    return cli(NAME, __doc__, add_args, lambda a, argv: run(a.events, a.users, a.items, a.days, argv=argv), render, argv)


if __name__ == "__main__":
    sys.exit(main())

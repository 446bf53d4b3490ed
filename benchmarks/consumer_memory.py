"""Peak memory (RSS) of the incremental consumer with 1M users and 100k items in the version.

    python -m benchmarks.consumer_memory [--users 1000000] [--items 100000] [--events 100000] [--hours 4]

Version: written straight at that size in the product's artifact layout by
benchmarks.bench_version (the product's TwoTower at its seeded initial weights: training a model
on 1M users does not fit this machine, and memory depends on the table sizes, not the weights),
with a real index, registered in Redis without writing 1M rows (the consumer starts a vocabulary
user without a row from the model's row, which is the path it takes for most users anyway).

Stream: ``--events`` events from users drawn uniformly from the 1M (so nearly every event
touches a different user), on vocabulary items, spread over ``--hours`` event-time hours after
the version's cutoff, then one event per partition past the last hour's end + allowed lateness
so that every measured hour closes. Produced by the product's producer into a fresh topic.

Measured: the real consumer process (``python -m streaming.consumer --mode bounded``) applies
every closed hour and exits. Peak RSS is the kernel's ``ru_maxrss`` of that child (os.wait4);
a psutil thread samples its RSS every ``SAMPLE_S`` as well (the trajectory's median and the
RSS once the version is loaded, i.e. before the first hour is applied). For scale: the RSS of a
process that only imports what the consumer imports, and the size of the version's tables.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np

from benchmarks.freshness import subprocess_env
from benchmarks.limits_common import cli, fmt, header, percentiles, scratch_deployment
from twotower.config import PROJECT_ROOT, Settings, load_settings

log = logging.getLogger("benchmarks.consumer_memory")

NAME = "consumer_memory"
HOUR_MS = 3_600_000
SAMPLE_S = 0.1
MIB = 2**20


def produce_stream(s: Settings, n_events: int, hours: int, start_ms: int, n_users: int, n_items: int, seed: int = 3) -> dict[str, Any]:
    """Send the stream described in the module docstring; returns counts and timing."""
    from streaming.clients import make_producer
    from streaming.events import Event, encode_event

    rng = np.random.default_rng(seed)
    users = rng.integers(1, n_users + 1, n_events)
    items = rng.integers(1, n_items + 1, n_events)
    ts = np.sort(start_ms + rng.integers(0, hours * HOUR_MS, n_events))
    close_ts = start_ms + hours * HOUR_MS + s.incremental.allowed_lateness_s * 1000
    producer = make_producer(s.kafka)
    t0 = time.perf_counter()
    parts: set[int] = set()
    try:
        for i in range(n_events):
            uid = f"u{users[i]}"
            ev = Event(f"mem-{i}", uid, f"i{items[i]}", "click", int(ts[i]))
            producer.send(s.kafka.topic, key=uid.encode(), value=encode_event(ev), timestamp_ms=int(ts[i]))
        k = 0
        while len(parts) < s.kafka.partitions and k < 100 * s.kafka.partitions:  # one closing event on every partition
            uid = f"u{rng.integers(1, n_users + 1)}"
            ev = Event(f"mem-close-{k}", uid, f"i{rng.integers(1, n_items + 1)}", "click", close_ts)
            parts.add(producer.send(s.kafka.topic, key=uid.encode(), value=encode_event(ev), timestamp_ms=close_ts).get(timeout=30).partition)
            k += 1
        producer.flush()
    finally:
        producer.close()
    return {"events": n_events, "distinct_users": int(len(np.unique(users))), "hours": hours, "closing_events": k,
            "produce_seconds": round(time.perf_counter() - t0, 2)}  # fmt: skip


def run_child(cmd: list[str], env: dict[str, str], log_path) -> dict[str, Any]:
    """Run ``cmd``, sampling its RSS; returns exit code, peak RSS (ru_maxrss) and the samples."""
    import psutil

    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        samples: list[tuple[float, int]] = []
        done = threading.Event()

        def sample() -> None:
            ps = psutil.Process(proc.pid)
            t0 = time.perf_counter()
            while not done.is_set():
                try:
                    samples.append((time.perf_counter() - t0, ps.memory_info().rss))
                except psutil.Error:
                    return
                done.wait(SAMPLE_S)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.perf_counter()
        _, status, usage = os.wait4(proc.pid, 0)  # reaps the child and returns its own rusage
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        done.set()
        sampler.join()
    return {"returncode": proc.returncode, "seconds": round(seconds, 2), "ru_maxrss_bytes": usage.ru_maxrss * 1024, "samples": samples}


def loaded_rss(samples: list[tuple[float, int]], log_text: str, started: float) -> int | None:
    """The largest RSS sampled before the consumer logged its first applied hour (the version is
    loaded by then); the log's timestamps have one-second resolution, local time."""
    line = next((ln for ln in log_text.splitlines() if " applied to version " in ln), None)
    if line is None or not samples:
        return None
    try:
        at = dt.datetime.strptime(line[:19], "%Y-%m-%d %H:%M:%S").timestamp() - started
    except ValueError:
        return None
    before = [rss for t, rss in samples if t <= at]
    return max(before) if before else None


def run(n_users: int = 1_000_000, n_items: int = 100_000, n_events: int = 100_000, hours: int = 4,
        settings: Settings | None = None, argv: list[str] | None = None) -> dict[str, Any]:  # fmt: skip
    """Build and register the version, produce the stream, run the consumer, measure its memory."""
    from benchmarks.bench_version import publish_bench_version

    base = settings or load_settings()
    cutoff_day = dt.datetime.now(dt.timezone.utc).date() - dt.timedelta(days=2)
    with scratch_deployment(base, NAME, kafka=True) as s:
        facts = publish_bench_version(s, n_users, n_items, cutoff_day, write_rows=False)
        stream = produce_stream(s, n_events, hours, facts["data_cutoff_ms"], n_users, n_items)
        logs = s.paths.state_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        env = subprocess_env(s)
        imports = run_child([sys.executable, "-c", "import torch, kafka, redis, streaming.consumer"], env, logs / "imports.log")
        started = time.time()
        child = run_child([sys.executable, "-m", "streaming.consumer", "--mode", "bounded"], env, logs / "consumer.log")
        log_text = (logs / "consumer.log").read_text()
        if child["returncode"] != 0:
            raise RuntimeError(f"the consumer exited with {child['returncode']}: {log_text[-2000:]}")
    import json

    report = json.loads(next(ln for ln in reversed(log_text.splitlines()) if ln.startswith("{")))  # its stdout report
    rss = [r for _, r in child["samples"]]
    id_dim = facts["model"]["id_dim"]
    return {
        **header(NAME, argv),
        "version": {k: facts[k] for k in ("version", "n_users", "n_items", "build_seconds", "publish_seconds", "rows_published")},
        "tables_bytes": {"user_id_rows": (n_users + 1) * id_dim * 4, "item_id_rows": (n_items + 1) * id_dim * 4,
                         "item_vectors": (n_items + 1) * facts["model"]["dim"] * 4},  # fmt: skip
        "stream": stream,
        "consumer": {
            "seconds": child["seconds"],
            "hours_applied": report["hours_applied"],
            "users_updated": report["users_updated"],
            "events_applied": report["events_applied"],
            "records_read": report["records_read"],
            "peak_rss_bytes": child["ru_maxrss_bytes"],
            "sampled_peak_rss_bytes": max(rss) if rss else None,
            "sampled_median_rss_bytes": int(np.median(rss)) if rss else None,
            "rss_before_first_hour_bytes": loaded_rss(child["samples"], log_text, started),
            "samples": len(rss),
            "sample_interval_s": SAMPLE_S,
        },
        "imports_only_peak_rss_bytes": imports["ru_maxrss_bytes"],
        "rss_percentiles_mib": percentiles(np.asarray(rss) / MIB, 1),
    }


def render(result: dict[str, Any]) -> list[str]:
    """Markdown lines of the memory section."""
    c, v, st, tb = result["consumer"], result["version"], result["stream"], result["tables_bytes"]

    def mib(x: int | None) -> str:
        return "-" if x is None else f"{x / MIB:,.0f}"

    return [
        f"Version of {fmt(v['n_users'])} users x {fmt(v['n_items'])} items "
        "written straight in the artifact layout (product model at seeded initial weights, not trained: memory depends on the "
        f"sizes), registered without writing its user rows. Stream: {fmt(st['events'])} events from {fmt(st['distinct_users'])} distinct "
        f"users over {st['hours']} event-time hours; the consumer (`python -m streaming.consumer --mode bounded`) applied "
        f"{c['hours_applied']} hours, {fmt(c['users_updated'])} users, {fmt(c['events_applied'])} events in {c['seconds']} s.",
        "",
        "| process | peak RSS (MiB) | notes |",
        "|---|---|---|",
        f"| **consumer, {fmt(v['n_users'])} users / {fmt(v['n_items'])} items** | **{mib(c['peak_rss_bytes'])}** | ru_maxrss of the child; "
        f"sampled: peak {mib(c['sampled_peak_rss_bytes'])}, median {mib(c['sampled_median_rss_bytes'])}, "
        f"{mib(c['rss_before_first_hour_bytes'])} with the version loaded before the first hour |",
        f"| a process importing only the consumer's modules | {mib(result['imports_only_peak_rss_bytes'])} | interpreter, torch, kafka-python, redis |",
        "",
        f"Version tables for scale: user-ID rows {mib(tb['user_id_rows'])} MiB, item-ID rows {mib(tb['item_id_rows'])} MiB, "
        f"item vectors {mib(tb['item_vectors'])} MiB (float32).",
        "",
    ]


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--users", type=int, default=1_000_000)
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--events", type=int, default=100_000)
    p.add_argument("--hours", type=int, default=4)


def main(argv: list[str] | None = None) -> int:
    return cli(NAME, __doc__, add_args, lambda a, argv: run(a.users, a.items, a.events, a.hours, argv=argv), render, argv)


if __name__ == "__main__":
    sys.exit(main())

"""Incremental consumer throughput beside the raw consume rate of the same client, in one run.

    python -m benchmarks.stream_throughput [--events 100000] [--days 10] [--movielens-share 0.6]

Everything goes through the product's own code: ingest -> nightly retrain and publish (1 epoch:
model quality does not change the update cost) -> replay of the days after the cutoff into a
fresh topic -> (1) the raw consume rate: a kafka-python consumer made like the product's,
reading every record of that topic and doing nothing else; (2) the end-to-end rate: the
incremental consumer in bounded mode, from Kafka to user rows in Redis, with the configured
applier (streaming.applier) and with the other kind, each run on its own identical copy of the
published deployment. Both clocks start when the first records arrive. Each path runs
RAW_RUNS / E2E_RUNS times, interleaved; reported: the median events/s of each (every run's
beside it) and the ratio of the medians (the issue's target is >= 0.5).

A third runs one consumer whose process applier has APPLIER_WORKERS worker processes, each
applying the hours of its share of the partitions (streaming.applier.ShardedApplier). A fourth
runs GROUP_MEMBERS consumer processes (``python -m streaming.consumer
--mode bounded``, default applier) in one consumer group, started together: DESIGN §8's way to
scale out, each member owning some partitions. Its window runs from the first record any member
read to the end of the last member's window.

Two workloads, because the update's cost is per user-hour and the reading cost per event:
  * synthetic (jobs.synthetic: power-law popularity, drifting tastes), seeded: 5,000 users with
    about one event per user-hour, the worst case for the ratio;
  * MovieLens-100K's later months (the first 40% of its ratings train the version, the rest
    stream): real sessions, about 28 ratings per user-hour on average. Skipped, saying so, when
    the data is absent.
Results go to benchmarks/out/stream_throughput.json with the machine and the command. A
benchmark reports; it never fails on speed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
import uuid
from contextlib import closing
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.cpu_sampler import CpuSampler
from benchmarks.limits_common import drop_prefix, write_result
from jobs.redis_conn import redis_client
from twotower.config import PROJECT_ROOT, Settings, load_settings, settings_env
from twotower.logs import setup_logging

log = logging.getLogger("benchmarks.stream_throughput")
OUT = Path(__file__).resolve().parent / "out"
RAW_RUNS, E2E_RUNS = 5, 5
"""Runs per path and workload; the medians are reported, with every run's rate beside them (the
raw rate has swung by 2x between runs of one benchmark on the shared 2-core machine: 5 runs give
its median some footing)."""
GROUP_MEMBERS = 2
"""Consumer processes in the group path."""
APPLIER_WORKERS = 2
"""Worker processes of the sharded path (one consumer, the process applier split by partition:
streaming.applier.ShardedApplier)."""


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}


def raw_consume_rate(settings: Settings, topic: str, expected: int) -> tuple[int, float, float]:
    """Read every record of ``topic`` with a plain kafka-python consumer made like the product's
    (streaming.clients.make_consumer: same settings); (records, wall s, CPU s). The clock starts
    when the first records arrive, as the end-to-end window does (consumer.reading_seconds):
    neither counts connecting, the offset lookup or the first fetch's wait."""
    from kafka import TopicPartition

    from streaming.clients import make_consumer

    consumer = make_consumer(settings.kafka, group_id=None)
    partitions = [p for p in consumer.partitions_for_topic(topic) or []]
    consumer.assign([TopicPartition(topic, p) for p in partitions])
    consumer.seek_to_beginning()
    n, t0, c0, idle_since = 0, None, 0.0, None
    while n < expected:
        batch = consumer.poll(timeout_ms=500, max_records=settings.incremental.poll_max_records)
        got = sum(len(v) for v in batch.values())
        if got and t0 is None:
            t0, c0 = time.perf_counter(), time.process_time()
        n += got
        if got == 0:
            idle_since = idle_since or time.perf_counter()
            if time.perf_counter() - idle_since > 10:
                break  # the topic holds fewer records than expected; report what was read
        else:
            idle_since = None
    seconds, cpu = time.perf_counter() - (t0 or time.perf_counter()), time.process_time() - c0
    consumer.close()
    return n, seconds, cpu


def copy_prefix(client, src: str, dst: str) -> int:
    """COPY every key under ``src:`` to the same name under ``dst:`` (a second, identical
    deployment: the published version, its rows and the histories, before any consumer ran)."""
    n = 0
    for key in client.scan_iter(match=f"{src}:*", count=5000):
        n += int(client.copy(key, dst + key.decode()[len(src) :]))
    return n


def end_to_end(settings: Settings) -> dict[str, Any]:
    """One bounded consumer run from Kafka to Redis, timed: the throughput window (first record
    read to the last hour written and checkpointed) and the whole run (process start work: group
    join, version load, the applier's start)."""
    from streaming.consumer import run_bounded

    t0, c0 = time.perf_counter(), time.process_time()
    with closing(redis_client(settings)) as client, CpuSampler(client) as sampler:
        report = run_bounded(settings)
    total_s, cpu = time.perf_counter() - t0, time.process_time() - c0
    window = None
    if report.get("first_record_at_ms") and report.get("reading_seconds"):
        start = report["first_record_at_ms"] / 1000
        window = sampler.between(start, start + report["reading_seconds"])
    return {
        "applier": settings.incremental.applier,
        **_timed([report], report.get("reading_seconds") or total_s, total_s),
        "cached_users": report.get("cached_users", {}),
        "cpu_seconds_this_process": round(cpu, 2),
        "cpu_seconds_in_window": window,
    }


def _timed(reports: list[dict[str, Any]], window: float, total_s: float) -> dict[str, Any]:
    """The counters of one run's consumer reports (summed over a group's members) and its rates
    over the throughput ``window`` and the whole run (s)."""
    records = sum(r["records_read"] for r in reports)
    return {
        "records_read": records,
        **{k: sum(r[k] for r in reports) for k in ("hours_applied", "users_updated", "events_applied")},
        "seconds": round(window, 2),
        "run_seconds": round(total_s, 2),
        "events_per_s": round(records / window) if window else None,
        "events_per_s_whole_run": round(records / total_s) if total_s else None,
    }


def end_to_end_group(settings: Settings, members: int = GROUP_MEMBERS) -> dict[str, Any]:
    """``members`` bounded consumer processes in one group, started together, timed as one run:
    from the first record any of them read to the end of the last one's window (each member's
    report gives its window's start on the wall clock and its length)."""
    env = dict(os.environ) | settings_env(settings)
    cmd = [sys.executable, "-m", "streaming.consumer", "--mode", "bounded"]
    t0 = time.perf_counter()
    procs = [subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(members)]
    outputs = [proc.communicate(timeout=900) for proc in procs]
    total_s = time.perf_counter() - t0
    reports = []
    for proc, (out, err) in zip(procs, outputs):
        lines = out.strip().splitlines()
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"a group member exited with {proc.returncode}: {out[-2000:]}\n{err[-4000:]}")
        reports.append(json.loads(lines[-1]))
    windows = [(r["first_record_at_ms"] / 1000, r["first_record_at_ms"] / 1000 + r["reading_seconds"]) for r in reports if r.get("first_record_at_ms")]
    window = max(end for _, end in windows) - min(start for start, _ in windows) if windows else total_s
    return {
        "applier": f"{settings.incremental.applier}, {members} members of one group",
        "members": members,
        **_timed(reports, window, total_s),
        "records_by_member": [r["records_read"] for r in reports],
    }


def bench_settings(tag: str) -> Settings:
    """A private deployment: state dir, Redis prefix, topic and group of its own."""
    settings = load_settings().replace("paths", state_dir=OUT / f"state-stream-{tag}").replace("redis", prefix=f"tt-bench-{tag}")
    settings = settings.replace(
        "kafka", topic=f"bench-{tag}", dead_letter_topic=f"bench-{tag}.dlq", group_id=f"bench-{tag}", session_timeout_ms=3000
    )
    return settings.replace("train", epochs=1)


def movielens_cutoff(ml_dir: Path, replay_share: float) -> tuple[dt.date, dt.date]:
    """(nightly logical date, last day): the cutoff that leaves about ``replay_share`` of
    MovieLens-100K's ratings to stream."""
    ts = np.sort(np.loadtxt(ml_dir / "u.data", dtype=np.int64, usecols=3))
    cut = int(ts[int(len(ts) * (1 - replay_share))])
    day = lambda s: dt.datetime.fromtimestamp(s, tz=dt.timezone.utc).date()  # noqa: E731
    return day(cut), day(int(ts[-1]))


def measure(settings: Settings, cutoff_day: dt.date, end_day: dt.date) -> dict[str, Any]:
    """On ingested raw data: nightly at ``cutoff_day``, replay of the days after it, the raw rate
    and the end-to-end rate of both applier kinds (each on its own identical copy)."""
    from infra.kafka_topics import ensure_topics
    from jobs.nightly import run_nightly
    from streaming.clients import make_admin
    from streaming.replayer import replay
    from twotower.contracts import day_start_ms

    kinds = [settings.incremental.applier, "thread" if settings.incremental.applier == "process" else "process"]
    pristine = settings.redis.prefix + "-pristine"
    raws: list[dict[str, Any]] = []
    runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in kinds}
    group_runs: list[dict[str, Any]] = []
    sharded_runs: list[dict[str, Any]] = []
    try:
        nightly = run_nightly(settings, cutoff_day)
        admin = make_admin(settings.kafka)
        ensure_topics(admin, [(settings.kafka.topic, settings.kafka.partitions), (settings.kafka.dead_letter_topic, settings.kafka.partitions)])
        admin.close()
        rep = replay(settings, day_start_ms(cutoff_day + dt.timedelta(days=1)), day_start_ms(end_day + dt.timedelta(days=1)))
        with closing(redis_client(settings)) as client:
            copy_prefix(client, settings.redis.prefix, pristine)
        # interleaved, so that a drift of the machine's speed hits every path alike
        for i in range(max(RAW_RUNS, E2E_RUNS)):
            if i < RAW_RUNS:
                n, seconds, cpu = raw_consume_rate(settings, settings.kafka.topic, rep.events)
                raws.append({"records": n, "seconds": round(seconds, 3), "cpu_seconds": round(cpu, 2), "events_per_s": round(n / seconds) if seconds else None})
            if i < E2E_RUNS:
                for kind in kinds:
                    runs[kind].append(end_to_end(fresh_copy(settings, pristine, f"{kind}-{i}").replace("incremental", applier=kind)))
                group_runs.append(end_to_end_group(fresh_copy(settings, pristine, f"group-{i}")))
                sharded = fresh_copy(settings, pristine, f"sharded-{i}").replace("incremental", applier="process", applier_workers=APPLIER_WORKERS)
                sharded_runs.append(end_to_end(sharded) | {"applier": f"process, {APPLIER_WORKERS} workers"})
    finally:
        shutil.rmtree(settings.paths.state_dir, ignore_errors=True)
        with closing(redis_client(settings)) as client:
            tags = [f"{k}-{i}" for k in [*kinds, "group", "sharded"] for i in range(E2E_RUNS)]
            for prefix in [settings.redis.prefix, pristine] + [f"{settings.redis.prefix}-{t}" for t in tags]:
                drop_prefix(client, prefix)
    raw = median_run(raws)
    e2e, other, group, sharded = median_run(runs[kinds[0]]), median_run(runs[kinds[1]]), median_run(group_runs), median_run(sharded_runs)
    ratio = lambda run: round(run["events_per_s"] / raw["events_per_s"], 3) if raw["events_per_s"] and run["events_per_s"] else None  # noqa: E731
    return {
        "events_replayed": rep.events,
        "version": nightly.version,
        "replayed_days": (end_day - cutoff_day).days,
        "events_per_user_hour": round(e2e["events_applied"] / max(1, e2e["users_updated"]), 2),
        "raw_consume": raw | {"all_events_per_s": [r["events_per_s"] for r in raws]},
        "end_to_end": e2e | {"all_events_per_s": [r["events_per_s"] for r in runs[kinds[0]]]},
        "end_to_end_other_applier": other | {"all_events_per_s": [r["events_per_s"] for r in runs[kinds[1]]]},
        "end_to_end_group": group | {"all_events_per_s": [r["events_per_s"] for r in group_runs]},
        "end_to_end_sharded": sharded | {"all_events_per_s": [r["events_per_s"] for r in sharded_runs]},
        "ratio_end_to_end_to_raw": ratio(e2e),
        "ratio_other_applier_to_raw": ratio(other),
        "ratio_group_to_raw": ratio(group),
        "ratio_sharded_to_raw": ratio(sharded),
    }


def fresh_copy(settings: Settings, pristine: str, tag: str) -> Settings:
    """A deployment of its own for one consumer run: the pristine copy's keys under a new prefix
    (a published version and its rows, before any consumer ran) and a group of its own."""
    prefix = f"{settings.redis.prefix}-{tag}"
    with closing(redis_client(settings)) as client:
        drop_prefix(client, prefix)
        copy_prefix(client, pristine, prefix)
    return settings.replace("redis", prefix=prefix).replace("kafka", group_id=f"{settings.kafka.group_id}-{tag}")


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median events/s (the lower middle one of an even count)."""
    ordered = sorted(runs, key=lambda r: r["events_per_s"] or 0)
    return ordered[(len(ordered) - 1) // 2]


def run(n_events: int = 100_000, days: int = 10, movielens_share: float = 0.6) -> dict[str, Any]:
    """Both workloads: the sparse synthetic stream (about one event per user-hour: the per-user
    cost dominates) and MovieLens-100K's own later months (real sessions: many events per
    user-hour), when the data is present."""
    from jobs.ingest import ingest_movielens, ingest_synthetic
    from jobs.synthetic import SyntheticSpec

    settings = bench_settings(uuid.uuid4().hex[:8])
    spec = SyntheticSpec(n_users=5000, n_items=2000, n_events=n_events, days=days + 5, seed=11)
    ingest_synthetic(settings.paths.raw_dir, spec)
    synthetic = measure(settings, spec.end_day - dt.timedelta(days=days), spec.end_day)
    synthetic["spec"] = asdict(spec) | {"end_day": spec.end_day.isoformat()}
    workloads = {"synthetic": synthetic}
    ml_dir = load_settings().paths.movielens_dir
    if (ml_dir / "u.data").exists():
        settings = bench_settings(uuid.uuid4().hex[:8])
        ingest_movielens(ml_dir, settings.paths.raw_dir)
        cutoff_day, end_day = movielens_cutoff(ml_dir, movielens_share)
        workloads["movielens"] = measure(settings, cutoff_day, end_day) | {"cutoff_day": cutoff_day.isoformat()}
    else:
        log.warning("MovieLens-100K not found at %s: the real-data workload is skipped", ml_dir)
    inc = load_settings().incremental
    return {
        "benchmark": "stream_throughput",
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.stream_throughput", *sys.argv[1:]]),
        "measured_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "update": {"negatives": inc.negatives, "steps": inc.steps, "torch_threads": inc.threads, "applier": inc.applier},
        "workloads": workloads,
        "target_ratio": 0.5,
    }


def render(result: dict[str, Any]) -> list[str]:
    """RESULTS.md section (see benchmarks.run)."""
    u = result.get("update", {})
    lines = [
        f"Update: {u.get('steps', '?')} steps, {u.get('negatives', '?')} sampled negatives, {u.get('torch_threads', '?')} torch thread(s). "
        "Both clocks start when the first records arrive; the end-to-end one stops when the last hour is written and its positions stored. "
        "'whole run' adds the start (group join, version load, the applier's start), which the raw reader has no equivalent of. "
        "Each row is the median run of its path; 'all runs' lists every run's events/s.",
        "",
    ]
    for name, w in result.get("workloads", {}).items():
        raw, e2e, other, group = w["raw_consume"], w["end_to_end"], w.get("end_to_end_other_applier"), w.get("end_to_end_group")
        sharded = w.get("end_to_end_sharded")
        if name == "synthetic":
            spec = w.get("spec", {})
            title = f"Synthetic stream ({spec.get('n_users', '?')} users, {spec.get('n_items', '?')} items, seed {spec.get('seed', '?')})"
        else:
            title = f"MovieLens-100K after {w.get('cutoff_day', '?')}"
        lines += [
            f"**{title}**: {w['events_replayed']} events over {w.get('replayed_days', '?')} replayed days, "
            f"{w.get('events_per_user_hour', '?')} events per user-hour.",
            "",
            "| path | records | s | events/s (median) | all runs | whole run s | events/s, whole run |",
            "|---|---|---|---|---|---|---|",
            f"| raw kafka-python consume (same client settings, same topic) | {raw['records']} | {raw['seconds']} | {raw['events_per_s']} | "
            f"{', '.join(str(r) for r in raw.get('all_events_per_s', []))} | - | - |",
        ]
        for run_ in [e2e] + [r for r in (other, sharded, group) if r]:
            lines.append(
                f"| end to end, applier = {run_.get('applier', '?')}: Kafka -> user rows in Redis | {run_['records_read']} | "
                f"{run_['seconds']} | {run_['events_per_s']} | {', '.join(str(r) for r in run_.get('all_events_per_s', []))} | "
                f"{run_.get('run_seconds', '-')} | {run_.get('events_per_s_whole_run', '-')} |"
            )
        cache = e2e.get("cached_users") or {}
        lines += [
            "",
            f"End-to-end / raw events/s, medians: **{w['ratio_end_to_end_to_raw']}** with the default applier ({e2e.get('applier', '?')})"
            + (f", {w.get('ratio_other_applier_to_raw')} with the {other.get('applier')} applier" if other else "")
            + (f", {w.get('ratio_sharded_to_raw')} with the {sharded.get('applier')}" if sharded else "")
            + (f", {w.get('ratio_group_to_raw')} with {group.get('members')} members of one group" if group else "")
            + f" (target {result['target_ratio']}); {e2e['hours_applied']} hours applied, {e2e['users_updated']} user rows updated"
            + (f"; user cache: {cache.get('hits')} hits, {cache.get('misses')} Redis reads." if cache else "."),
            "",
            *cpu_lines(raw, [e2e] + [r for r in (other, sharded) if r], result.get("machine", {}).get("cpus")),
        ]
    return lines


def cpu_lines(raw: dict[str, Any], runs: list[dict[str, Any]], cpus: int | None) -> list[str]:
    """Where each median run's CPU went in its window (benchmarks.cpu_sampler), beside the raw
    reader's: what bounds the rate where the parts share few cores."""
    lines = []
    for run_ in runs:
        cpu = run_.get("cpu_seconds_in_window") or {}
        if not cpu or any(v is None for v in cpu.values()) or not run_.get("seconds"):
            continue
        total = sum(cpu.values())
        lines.append(
            f"- CPU in the {run_.get('applier')} run's {run_['seconds']} s window: consumer {cpu['consumer']} s, applier workers "
            f"{cpu['applier_workers']} s, Redis {cpu['redis']} s: {total:.2f} s in all, {total / run_['seconds']:.2f} of {cpus or '?'} cores busy."
        )
    if lines:
        lines += [f"- CPU of the raw reader: {raw.get('cpu_seconds')} s in its {raw.get('seconds')} s.", ""]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.stream_throughput", description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--days", type=int, default=10, help="synthetic: days after the cutoff that are replayed")
    parser.add_argument("--movielens-share", type=float, default=0.6, help="MovieLens: share of the ratings streamed after the cutoff")
    args = parser.parse_args(argv)
    setup_logging()
    result = run(args.events, args.days, args.movielens_share)
    write_result(result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

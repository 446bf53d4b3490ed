"""Freshness: how long after an event is produced the user's row in Redis reflects it, with the
real incremental consumer in continuous mode, at fixed input rates.

    python -m benchmarks.freshness [--rates 50 200 1000] [--hours 4] [--hour-seconds 6]

What bounds freshness, and what is measured
-------------------------------------------
The consumer applies events by event-time hour (streaming.windows: the hour is fixed at one
hour, it is not a setting). Hour ``h`` is applied once the watermark, the minimum over
partitions of the largest event ts seen minus ``incremental.allowed_lateness_s`` (600 s), passes
its end. So with event time = wall time, an event waits for the rest of its hour (0-60 min)
plus the lateness (10 min) before the consumer may touch it: 10-70 minutes, by design, whatever
the consumer does. Waiting that long per rate cannot be a benchmark. Instead event time runs
faster than wall time: the producer stamps events from a simulated clock on which one hour
lasts ``--hour-seconds`` of wall time (6 s by default: 600x), at a fixed wall-clock rate of
events per second. Everything else is real: the product's consumer process
(``python -m streaming.consumer --mode continuous``), the broker, Redis, a published version.

Per event we record the wall time it was produced, and a poller reads the user's row
(``HGET <p>:row:<v>:{u:<id>} w``: the last hour applied) every ``POLL_S``; the event is visible
when ``w`` reaches its hour. Two latencies per event:

* **apply latency** (the consumer's share, the number that matters): visible time minus the
  time its hour became closable, i.e. the moment the last partition received an event with
  ts >= hour end + allowed lateness. It is what the consumer adds on top of the window: notice
  the watermark, read rows and histories, run the update, write rows, make them visible. It does
  not depend on the clock compression.
* **produce -> visible** on the compressed clock: apply latency plus the (compressed) wait for
  the hour to end and the lateness. Reported for completeness; it scales with the compression.

Freshness in production is then: time to the end of the event's hour (0-60 min) + allowed
lateness (600 s) + apply latency. The render states this formula next to the measured apply
latency; it is derived from the configuration, not measured.

Version: a benchmark version (benchmarks.bench_version: the product's model at its seeded
initial weights, ``--users`` x ``--items``, rows published by jobs.publish), because the apply
cost depends on the sizes, not the weights. Events come from vocabulary users and items drawn
uniformly. Unique Redis prefix and topics, removed afterwards.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.limits_common import cli, fmt, header, percentiles, scratch_deployment
from twotower.config import PROJECT_ROOT, Settings, load_settings

log = logging.getLogger("benchmarks.freshness")

NAME = "freshness"
HOUR_MS = 3_600_000
POLL_S = 0.02
"""How often the poller reads the rows it waits for (the latency resolution)."""
READY_TIMEOUT_S = 120.0
DRAIN_TIMEOUT_S = 60.0
"""After the last event of a rate, how long pending events may take to become visible."""
APPLIED_LINE = re.compile(r"hour (\S+ \S+ UTC) applied to version .*?, (\d+) events, .*?, ([\d.]+)s \(read ([\d.]+)s, update ([\d.]+)s, write ([\d.]+)s\)")


def subprocess_env(s: Settings) -> dict[str, str]:
    """Environment that points a child ``python -m ...`` at the scratch deployment of ``s``."""
    env = dict(os.environ)
    env.update({
        "TT_STATE_DIR": str(s.paths.state_dir), "TT_PATHS_STATE_DIR": str(s.paths.state_dir),
        "REDIS_URL": s.redis.url, "TT_REDIS_PREFIX": s.redis.prefix,
        "KAFKA_BOOTSTRAP_SERVERS": s.kafka.bootstrap_servers, "TT_KAFKA_TOPIC": s.kafka.topic,
        "TT_KAFKA_DEAD_LETTER_TOPIC": s.kafka.dead_letter_topic, "TT_KAFKA_GROUP_ID": s.kafka.group_id,
        "TT_KAFKA_SESSION_TIMEOUT_MS": str(s.kafka.session_timeout_ms),
    })  # fmt: skip
    return env


@dataclass
class Tracker:
    """Produced events waiting to become visible, and what was observed (shared with the poller)."""

    prefix: str
    version: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    pending: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    """user -> [(hour start ms, event number)] not yet visible."""
    visible_at: dict[int, float] = field(default_factory=dict)
    """event number -> wall time its user's row first showed its hour."""
    stop: threading.Event = field(default_factory=threading.Event)

    def add(self, user: str, hour: int, n: int) -> None:
        with self.lock:
            self.pending.setdefault(user, []).append((hour, n))

    def waiting(self) -> int:
        with self.lock:
            return sum(len(v) for v in self.pending.values())

    def poll_forever(self, client) -> None:
        from twotower import redis_keys as rk

        while not self.stop.is_set():
            with self.lock:
                users = list(self.pending)
            if users:
                pipe = client.pipeline(transaction=False)
                for u in users:
                    pipe.hget(rk.user_row(self.prefix, self.version, u), "w")
                applied = pipe.execute()
                now = time.time()
                with self.lock:
                    for u, w in zip(users, applied):
                        if w is None:
                            continue
                        w = int(w)
                        left = []
                        for hour, n in self.pending.get(u, []):
                            if w >= hour:
                                self.visible_at[n] = now
                            else:
                                left.append((hour, n))
                        if left:
                            self.pending[u] = left
                        else:
                            self.pending.pop(u, None)
            self.stop.wait(POLL_S)


class ConsumerProcess:
    """``python -m streaming.consumer --mode continuous`` against the scratch deployment."""

    def __init__(self, s: Settings, log_path: Path):
        self.s, self.log_path = s, log_path
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "ConsumerProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "streaming.consumer", "--mode", "continuous"], cwd=PROJECT_ROOT,
                                     env=subprocess_env(self.s), stdout=self._log, stderr=subprocess.STDOUT)  # fmt: skip
        return self

    def wait_ready(self, client, version: str) -> float:
        """Seconds until the consumer has its partitions (it stores their seeded checkpoints)."""
        from twotower import redis_keys as rk

        t0 = time.time()
        key = rk.incremental(self.s.redis.prefix, f"ckpt:{version}")
        while time.time() - t0 < READY_TIMEOUT_S:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"the consumer exited with {self.proc.returncode}; see {self.log_path}")
            if client.hlen(key) >= self.s.kafka.partitions:
                return time.time() - t0
            time.sleep(0.2)
        raise RuntimeError(f"the consumer did not take its partitions in {READY_TIMEOUT_S:.0f} s; see {self.log_path}")

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def produce_at_rate(producer, topic: str, tracker: Tracker, rate: float, start_ms: int, seconds: float, hour_s: float,
                    n_users: int, n_items: int, first_n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:  # fmt: skip
    """Send ``rate`` events/s for ``seconds`` of wall time, event time starting at ``start_ms`` and
    running one hour per ``hour_s``; returns per event: produce wall time, ts, hour, partition
    (filled by the delivery callbacks)."""
    from streaming.events import Event, encode_event

    n = int(round(rate * seconds))
    prod_t = np.zeros(n)
    ts = np.zeros(n, dtype=np.int64)
    part = np.full(n, -1, dtype=np.int64)
    users = rng.integers(1, n_users + 1, n)
    items = rng.integers(1, n_items + 1, n)
    ms_per_wall_s = HOUR_MS / hour_s

    def delivered(i: int):
        def cb(md) -> None:
            part[i] = md.partition

        return cb

    t0 = time.time()
    for i in range(n):
        due = t0 + i / rate
        wait = due - time.time()
        if wait > 0:
            time.sleep(wait)
        ts[i] = start_ms + int(i / rate * ms_per_wall_s)
        uid = f"u{users[i]}"
        ev = Event(f"fresh-{first_n + i}", uid, f"i{items[i]}", "click", int(ts[i]))
        hour = int(ts[i] - ts[i] % HOUR_MS)
        tracker.add(uid, hour, first_n + i)
        prod_t[i] = time.time()
        producer.send(topic, key=uid.encode(), value=encode_event(ev), timestamp_ms=int(ts[i])).add_callback(delivered(i))
    producer.flush()
    return {"t": prod_t, "ts": ts, "hour": ts - ts % HOUR_MS, "partition": part}


def closable_times(events: dict[str, np.ndarray], lateness_ms: int, partitions: int) -> dict[int, float]:
    """Hour start -> wall time the hour became closable: when the last partition got an event
    with ts >= hour end + lateness (hours that never became closable are absent). Pure."""
    out: dict[int, float] = {}
    for hour in np.unique(events["hour"]):
        need = int(hour) + HOUR_MS + lateness_ms
        firsts = []
        for p in range(partitions):
            sel = (events["partition"] == p) & (events["ts"] >= need)
            if not sel.any():
                break
            firsts.append(float(events["t"][sel].min()))
        else:
            out[int(hour)] = max(firsts)
    return out


def measure_rate(producer, s: Settings, tracker: Tracker, rate: float, start_ms: int, hours: int, hour_s: float,
                 n_users: int, n_items: int, first_n: int, rng) -> tuple[dict[str, Any], int]:  # fmt: skip
    """One rate: ``hours`` measured hours, then the lateness plus a margin of one second on the
    same clock so the last measured hour closes; returns (result, event time after the last event)."""
    lateness_ms = s.incremental.allowed_lateness_s * 1000
    seconds = hours * hour_s + lateness_ms / HOUR_MS * hour_s + 1.0
    events = produce_at_rate(producer, s.kafka.topic, tracker, rate, start_ms, seconds, hour_s, n_users, n_items, first_n, rng)
    measured = events["hour"] < start_ms + hours * HOUR_MS
    deadline = time.time() + DRAIN_TIMEOUT_S
    numbers = first_n + np.flatnonzero(measured)
    while time.time() < deadline and not all(int(k) in tracker.visible_at for k in numbers):
        time.sleep(0.1)
    closable = closable_times(events, lateness_ms, s.kafka.partitions)
    apply_ms, e2e_ms, missing = [], [], 0
    for i in np.flatnonzero(measured):
        seen = tracker.visible_at.get(first_n + int(i))
        if seen is None or int(events["hour"][i]) not in closable:
            missing += 1
            continue
        e2e_ms.append((seen - events["t"][i]) * 1000)
        apply_ms.append(max(0.0, seen - closable[int(events["hour"][i])]) * 1000)
    return {
        "rate_events_per_s": rate,
        "events_measured": int(measured.sum()),
        "events_sent": len(events["t"]),
        "achieved_rate": round(len(events["t"]) / (events["t"][-1] - events["t"][0]), 1) if len(events["t"]) > 1 else None,
        "hours_measured": hours,
        "not_visible_within_drain": missing,
        "apply_latency_ms": percentiles(apply_ms, 1),
        "produce_to_visible_compressed_ms": percentiles(e2e_ms, 1),
    }, events


def logged_hours(log_path: Path) -> list[tuple[int, int, float, float, float, float]]:
    """(hour start ms, events, total, read, update, write seconds) of every hour the consumer logged."""
    out = []
    for m in APPLIED_LINE.finditer(log_path.read_text() if log_path.exists() else ""):
        hour = dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M UTC").replace(tzinfo=dt.timezone.utc)
        out.append((int(hour.timestamp() * 1000), int(m.group(2)), *(float(x) for x in m.groups()[2:])))
    return out


def hour_timings(hours: list[tuple[int, int, float, float, float, float]], start_ms: int, end_ms: int) -> dict[str, Any]:
    """The consumer's own per-hour timings for hours in [start_ms, end_ms)."""
    rows = [h for h in hours if start_ms <= h[0] < end_ms]
    if not rows:
        return {"hours": 0}
    a = np.array([h[2:] for h in rows])
    return {"hours": len(rows), "events_per_hour": percentiles([h[1] for h in rows], 0),
            "seconds": {name: percentiles(a[:, j], 3) for j, name in enumerate(("total", "read", "update", "write"))}}  # fmt: skip


def run(rates: tuple[float, ...] = (50, 200, 1000), hours: int = 4, hour_s: float = 6.0, n_users: int = 2000,
        n_items: int = 1000, settings: Settings | None = None, argv: list[str] | None = None) -> dict[str, Any]:  # fmt: skip
    """Publish a version, start the continuous consumer, measure each rate in turn."""
    from benchmarks.bench_version import publish_bench_version
    from jobs.redis_conn import redis_client
    from streaming.clients import make_producer

    base = settings or load_settings()
    cutoff_day = dt.datetime.now(dt.timezone.utc).date() - dt.timedelta(days=2)
    per_rate: list[dict[str, Any]] = []
    with scratch_deployment(base, NAME, kafka=True) as s:
        facts = publish_bench_version(s, n_users, n_items, cutoff_day, write_rows=True)
        client = redis_client(s)
        tracker = Tracker(s.redis.prefix, facts["version"])
        poller = threading.Thread(target=tracker.poll_forever, args=(client,), daemon=True)
        log_path = s.paths.state_dir / "logs" / "consumer.log"
        producer = make_producer(s.kafka)
        try:
            with ConsumerProcess(s, log_path) as consumer:
                ready_s = consumer.wait_ready(client, facts["version"])
                log.info("consumer ready in %.1f s; measuring rates %s", ready_s, list(rates))
                poller.start()
                rng = np.random.default_rng(5)
                start_ms, first_n = facts["data_cutoff_ms"], 0
                spans = []
                for k, rate in enumerate([rates[0], *rates]):  # the first pass is a warm-up (first-call costs), not reported
                    res, events = measure_rate(producer, s, tracker, float(rate), start_ms, 1 if k == 0 else hours, hour_s,
                                               n_users, n_items, first_n, rng)  # fmt: skip
                    if k > 0:
                        log.info("rate %s events/s: apply latency p50 %s ms, p99 %s ms", rate, res["apply_latency_ms"]["p50"], res["apply_latency_ms"]["p99"])
                        per_rate.append(res)
                        spans.append((start_ms, start_ms + hours * HOUR_MS))
                    first_n += len(events["t"])
                    start_ms = int(events["hour"].max()) + HOUR_MS  # the next rate starts on a fresh hour
            logged = logged_hours(log_path)
            for res, (a, b) in zip(per_rate, spans):
                res["consumer_hour_timings"] = hour_timings(logged, a, b)
        finally:
            tracker.stop.set()
            producer.close()
            client.close()
    return {
        **header(NAME, argv),
        "version": {k: facts[k] for k in ("version", "n_users", "n_items", "build_seconds", "publish_seconds")},
        "clock": {"hour_wall_seconds": hour_s, "speedup": round(3600 / hour_s, 1), "allowed_lateness_s": base.incremental.allowed_lateness_s,
                  "lateness_wall_seconds": round(base.incremental.allowed_lateness_s / (3600 / hour_s), 3)},  # fmt: skip
        "poll_interval_ms": POLL_S * 1000,
        "consumer_ready_s": round(ready_s, 2),
        "partitions": base.kafka.partitions,
        "warmup": f"one hour at {rates[0]} events/s before the measured rates (not reported)",
        "rates": per_rate,
    }


def render(result: dict[str, Any]) -> list[str]:
    """Markdown lines of the freshness section."""
    c = result["clock"]
    lateness_min = c["allowed_lateness_s"] / 60
    lines = [
        "The real consumer (`python -m streaming.consumer --mode continuous`), "
        f"{result['partitions']} partitions, a published version of {fmt(result['version']['n_users'])} users x "
        f"{fmt(result['version']['n_items'])} items. Event time runs {c['speedup']}x faster than wall time (one hour = "
        f"{c['hour_wall_seconds']} s) so that hours close during the run; rows polled every {result['poll_interval_ms']:.0f} ms.",
        "",
        "**Apply latency** = row visible in Redis minus the moment the event's hour became closable (the watermark passed "
        "its end + allowed lateness): the consumer's own delay, independent of the clock compression.",
        "",
        "| input rate (events/s) | achieved | events measured | apply latency p50 (ms) | apply latency p99 (ms) | "
        "consumer's own hour apply p50 / max (s, from its log) | produce -> visible on the compressed clock p50 / p99 (ms) | "
        "not visible after 60 s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rates"]:
        a, e = r["apply_latency_ms"], r["produce_to_visible_compressed_ms"]
        t = r["consumer_hour_timings"].get("seconds", {}).get("total", {})
        lines.append(f"| {fmt(r['rate_events_per_s'])} | {r['achieved_rate']} | {fmt(r['events_measured'])} | {fmt(a['p50'])} | "
                     f"{fmt(a['p99'])} | {t.get('p50', '-')} / {t.get('max', '-')} | {fmt(e['p50'])} / {fmt(e['p99'])} | "
                     f"{r['not_visible_within_drain']} |")  # fmt: skip
    lines += [
        "",
        f"In production (event time = wall time) an event becomes visible after: the rest of its hour (0-60 min) + the allowed "
        f"lateness ({lateness_min:.0f} min) + the apply latency above, i.e. between {lateness_min:.0f} and {60 + lateness_min:.0f} "
        f"minutes, about {30 + lateness_min:.0f} min for the median event. This is derived from the window rules "
        "(streaming.windows), not measured: the hour is fixed by design.",
        "",
    ]
    return lines


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rates", type=float, nargs="+", default=[50, 200, 1000])
    p.add_argument("--hours", type=int, default=4, help="measured event-time hours per rate")
    p.add_argument("--hour-seconds", type=float, default=6.0, help="wall seconds per simulated event-time hour")
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--items", type=int, default=1000)


def main(argv: list[str] | None = None) -> int:
    return cli(NAME, __doc__, add_args, lambda a, argv: run(tuple(a.rates), a.hours, a.hour_seconds, a.users, a.items, argv=argv), render, argv)


if __name__ == "__main__":
    sys.exit(main())

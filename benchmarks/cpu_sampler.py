"""Where a benchmark run's CPU went: this process, its child processes (the process applier's
workers) and the Redis server, sampled on a clock so that any window of the run can be cut out
afterwards (the consumer's throughput window starts at its first record, which only the
consumer knows).

    with CpuSampler(redis_client) as cpu:
        report = run_bounded(settings)
    cpu.between(start_wall_s, end_wall_s)  # {"consumer": s, "applier_workers": s, "redis": s}

Process CPU comes from /proc (Linux; elsewhere those parts read None), the Redis server's from
its own INFO (used_cpu_user + used_cpu_sys), so a remote Redis counts too. Why it matters: on
a host with few cores the end-to-end rate is bounded by the CPU all parts need together, which
the raw reader's rate says nothing about (benchmarks/RESULTS.md, stream throughput).
"""

from __future__ import annotations

import bisect
import os
import threading
import time
from pathlib import Path
from typing import Any

SAMPLE_EVERY_S = 0.02
"""Sampling period (s): a window's ends are known to within it."""
_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu_s(pid: int | str) -> float | None:
    """User + system CPU seconds of process ``pid`` (all its threads), None where /proc has none."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / _HZ


def children_cpu_s() -> float | None:
    """CPU seconds of this process's live children, summed (None without /proc)."""
    pids: list[str] = []
    try:
        for task in Path(f"/proc/{os.getpid()}/task").iterdir():
            pids += (task / "children").read_text().split()
    except OSError:
        return None
    return sum(process_cpu_s(pid) or 0.0 for pid in pids)


def redis_cpu_s(client) -> float | None:
    """The Redis server's own CPU seconds (INFO cpu), None if it will not say."""
    try:
        info = client.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
    except Exception:  # noqa: BLE001 - a measurement aid: no number rather than a failed benchmark
        return None


class CpuSampler:
    """Samples (wall time, consumer, applier workers, Redis) every SAMPLE_EVERY_S on a thread.

    Children are summed while they live: a worker's CPU counts up to its last sample before it
    exits, which the windows cut out here end before (the consumer closes its applier after its
    window)."""

    PARTS = ("consumer", "applier_workers", "redis")

    def __init__(self, redis_client=None):
        self._redis = redis_client
        self._samples: list[tuple[float, float | None, float | None, float | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)

    def __enter__(self) -> "CpuSampler":
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY_S):
            self._sample()

    def _sample(self) -> None:
        redis = redis_cpu_s(self._redis) if self._redis is not None else None
        self._samples.append((time.time(), process_cpu_s(os.getpid()), children_cpu_s(), redis))

    def between(self, start_s: float, end_s: float) -> dict[str, float | None]:
        """CPU seconds of each part from wall time ``start_s`` to ``end_s`` (epoch seconds), from
        the samples nearest inside the window."""
        times = [s[0] for s in self._samples]
        a = min(bisect.bisect_left(times, start_s), len(times) - 1)
        b = max(bisect.bisect_right(times, end_s) - 1, a)
        out: dict[str, float | None] = {}
        for k, part in enumerate(self.PARTS, start=1):
            first, last = self._samples[a][k], self._samples[b][k]
            out[part] = round(last - first, 3) if first is not None and last is not None else None
        return out

"""benchmarks.cpu_sampler: a window of a run's CPU, cut from clock samples."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from benchmarks.cpu_sampler import CpuSampler, children_cpu_s, process_cpu_s


def test_a_window_takes_the_samples_nearest_inside_it():
    sampler = CpuSampler()
    sampler._samples = [(10.0, 1.0, 0.0, 5.0), (11.0, 1.5, 0.5, 5.1), (12.0, 2.5, 1.5, 5.3), (13.0, 2.6, 1.6, None)]
    assert sampler.between(10.5, 12.2) == {"consumer": 1.0, "applier_workers": 1.0, "redis": 0.2}
    assert sampler.between(10.5, 13.0)["redis"] is None  # an end Redis did not answer at: no number
    assert sampler.between(0.0, 5.0) == {"consumer": 0.0, "applier_workers": 0.0, "redis": 0.0}  # no sample inside


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process CPU is read from /proc")
def test_the_sampler_sees_this_process_a_child_and_redis_work(redis_client):
    start = time.time()
    with CpuSampler(redis_client) as sampler:
        child = subprocess.Popen([sys.executable, "-c", "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.4: pass\ntime.sleep(0.5)"])
        t = time.process_time()
        while time.process_time() - t < 0.3:
            pass
        redis_client.eval("local n = 0 for i = 1, 3000000 do n = n + i end return n", 0)
        time.sleep(0.3)  # the child is still sleeping: its CPU is all counted
        end = time.time()
        child.wait()
    cpu = sampler.between(start, end)
    assert 0.25 <= cpu["consumer"] <= 1.5
    assert cpu["applier_workers"] >= 0.35  # other children (the test broker) may add theirs
    assert cpu["redis"] > 0.0
    assert process_cpu_s(10**9) is None and children_cpu_s() >= 0.0

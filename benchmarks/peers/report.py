"""What every result of benchmarks.quality and benchmarks.train_throughput records about its run,
and the lines that open and close its RESULTS.md section."""

from __future__ import annotations

import datetime as dt
import os
import sys
from pathlib import Path
from typing import Any


def run_facts(name: str) -> dict[str, Any]:
    """benchmark, command, measured_at, machine and the load average (1, 5, 15 min) at this moment."""
    from benchmarks.stream_throughput import machine

    return {
        "benchmark": name,
        "command": " ".join([Path(sys.executable).name, "-m", f"benchmarks.{name}", *sys.argv[1:]]),
        "measured_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def header(title: str, result: dict) -> list[str]:
    """Section title and where, when and how the numbers were measured."""
    return [f"## {title}", "", f"Machine: {result['machine']}. Command: `{result['command']}`. Measured {result['measured_at']}.", ""]


def load_line(result: dict) -> list[str]:
    """How busy the machine was when the run ended (timings on a shared machine are noisy)."""
    if "load_average" not in result:
        return []
    return [f"Load average of the machine (1, 5, 15 min) at the end of the run: {result['load_average']}; other work shared the cores."]

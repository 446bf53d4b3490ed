"""``make bench``: run every benchmark, then write benchmarks/RESULTS.md and benchmarks/results.json.

    python -m benchmarks.run                      # everything, in the order below
    python -m benchmarks.run --only quality,stream_throughput
    python -m benchmarks.run --render-only        # re-render from benchmarks/out/*.json

Each benchmark runs in its own process (a crash or a leak in one cannot skew the next) and writes
``benchmarks/out/<name>.json`` with the machine, the command and its numbers; its module's
``render(result) -> list[str]`` gives its section of RESULTS.md. A benchmark that fails is listed
as not measured with its exit status. Benchmarks report; they never fail on speed, so this
command exits 0 whenever it could write the results.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"

BENCHES: list[tuple[str, str]] = [
    ("quality", "Quality against peers (MovieLens-100K, DESIGN §9 protocol)"),
    ("temporal_replay", "Does the incremental path pay? Temporal replay"),
    ("train_throughput", "Training throughput"),
    ("spark_prepare", "Spark prepare throughput"),
    ("stream_throughput", "Incremental consumer throughput"),
    ("redis_rate", "Redis pipelined-write rate"),
    ("freshness", "Freshness: event-to-Redis latency"),
    ("index_scale", "Index at 1M items"),
    ("serving_latency", "/recall latency"),
    ("consumer_memory", "Consumer memory"),
    ("load_test", "Sustained load (issue 7): fixed input rate, memory, accounting"),
]


def section(name: str, title: str, result: dict[str, Any] | None, failure: str | None) -> list[str]:
    """One benchmark's markdown: its own render() when it has one, else its JSON."""
    lines = [f"## {title}", ""]
    if result is None:
        return lines + [f"Not measured in this run: {failure or 'no result'}.", ""]
    lines += [f"Command: `{result.get('command', '?')}`. Measured {result.get('measured_at', '?')}.", ""]
    module = importlib.import_module(f"benchmarks.{name}")
    render = getattr(module, "render", None)
    if render is None:
        return lines + ["```json", json.dumps(result, indent=2)[:6000], "```", ""]
    body = list(render(result))
    if body and body[0].startswith("#"):  # the module writes its own heading and command line
        return body + [""]
    return lines + body + [""]


def machine_line(results: dict[str, dict]) -> str:
    for result in results.values():
        if isinstance(result, dict) and result.get("machine"):
            m = result["machine"]
            return ", ".join(f"{k} {v}" for k, v in m.items()) if isinstance(m, dict) else str(m)
    return "unknown"


def render_all(results: dict[str, dict], failures: dict[str, str], seconds: dict[str, float]) -> str:
    """RESULTS.md from the per-benchmark results (pure apart from importing the modules)."""
    lines = [
        "# Benchmark results",
        "",
        "Written by `make bench` (`python -m benchmarks.run`); every number below was measured by the",
        "command shown in its section. Machine: " + machine_line(results) + ".",
        "",
        "| benchmark | status | wall time (s) |",
        "|---|---|---|",
    ]
    for name, _title in BENCHES:
        status = "measured" if name in results else f"not measured ({failures.get(name, 'not run')})"
        lines.append(f"| {name} | {status} | {seconds.get(name, '-')} |")
    lines.append("")
    for name, title in BENCHES:
        lines += section(name, title, results.get(name), failures.get(name))
    return "\n".join(lines) + "\n"


def earlier_run() -> dict:
    """benchmarks/results.json as the last run wrote it, so that ``--only`` re-measures some
    benchmarks without dropping the sections of the others (each keeps the date it was measured
    on, and its wall time)."""
    try:
        return json.loads((HERE / "results.json").read_text())
    except (OSError, ValueError):
        return {}


def run_one(name: str) -> tuple[dict | None, str | None, float]:
    out = OUT / f"{name}.json"
    out.unlink(missing_ok=True)
    t0 = time.perf_counter()
    print(f"== {name}: python -m benchmarks.{name}", flush=True)
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{name}"], cwd=HERE.parent)
    seconds = round(time.perf_counter() - t0, 1)
    if proc.returncode != 0:
        return None, f"exit status {proc.returncode}; see the make bench log", seconds
    if not out.exists():
        return None, f"it wrote no {out.name}", seconds
    return json.loads(out.read_text()), None, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="comma-separated benchmark names (default: all)")
    parser.add_argument("--render-only", action="store_true", help="render from benchmarks/out/*.json without running")
    args = parser.parse_args(argv)
    names = [n for n, _ in BENCHES]
    chosen = [n.strip() for n in args.only.split(",") if n.strip()] or names
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {names}")
    OUT.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    failures: dict[str, str] = {}
    earlier = earlier_run()
    previous = earlier.get("results", {})
    seconds: dict[str, float] = {n: t for n, t in earlier.get("wall_seconds", {}).items() if n not in chosen or args.render_only}
    for name in names:
        path = OUT / f"{name}.json"
        if name in chosen and not args.render_only:
            result, failure, seconds[name] = run_one(name)
            if result is None:
                failures[name] = failure or "failed"
                continue
            results[name] = result
        elif path.exists():  # measured by an earlier run of this command: kept, with its own date
            results[name] = json.loads(path.read_text())
        elif name in previous:  # measured on an earlier day (benchmarks/results.json): kept, with its date
            results[name] = previous[name]
    (HERE / "RESULTS.md").write_text(render_all(results, failures, seconds))
    combined = {
        "written_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "results": results, "not_measured": failures, "wall_seconds": seconds,
    }  # fmt: skip
    (HERE / "results.json").write_text(json.dumps(combined, indent=2, sort_keys=True, default=str) + "\n")
    print(f"wrote {HERE / 'RESULTS.md'} and {HERE / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``make bench``: run every benchmark in one process and write benchmarks/RESULTS.md.

Each benchmark writes its own JSON (machine, command, numbers) under benchmarks/out/; this file
only runs them in turn and renders the table. Benchmarks report; they never fail on speed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
BENCHES = [
    ("stream_throughput", [sys.executable, "-m", "benchmarks.stream_throughput"]),
    ("serving_latency", [sys.executable, "-m", "benchmarks.serving_latency"]),
]


def render(results: dict[str, dict]) -> str:
    """RESULTS.md from the JSON results (pure)."""
    lines = ["# Benchmark results", "", "Written by `make bench`; every number below was measured in that run.", ""]
    st = results.get("stream_throughput")
    if st:
        lines += [
            "## Incremental consumer throughput (Kafka -> Redis)",
            "",
            f"Machine: {st['machine']}. Command: `{st['command']}`. Measured {st['measured_at']}.",
            "",
            "| path | events | seconds | events/s |",
            "|---|---|---|---|",
            f"| raw kafka-python consume (same client, same topic) | {st['raw_consume']['records']} | {st['raw_consume']['seconds']} | {st['raw_consume']['events_per_s']} |",
            f"| end to end: incremental consumer, bounded mode | {st['end_to_end']['records_read']} | {st['end_to_end']['seconds']} | {st['end_to_end']['events_per_s']} |",
            "",
            f"Ratio end-to-end / raw: **{st['ratio_end_to_end_to_raw']}** (target {st['target_ratio']}).",
            "",
        ]
    sl = results.get("serving_latency")
    if sl:
        lines += ["## /recall latency", "", "```json", json.dumps(sl, indent=2)[:4000], "```", ""]
    missing = [name for name, _ in BENCHES if name not in results]
    if missing:
        lines += ["Not measured in this run (failed; see the log): " + ", ".join(missing), ""]
    return "\n".join(lines)


def main() -> int:
    results = {}
    for name, cmd in BENCHES:
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        if subprocess.run(cmd, cwd=HERE.parent).returncode == 0 and (OUT / f"{name}.json").exists():
            results[name] = json.loads((OUT / f"{name}.json").read_text())
    (HERE / "RESULTS.md").write_text(render(results))
    print(f"wrote {HERE / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

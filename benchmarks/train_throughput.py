"""Training throughput: the product's trainer beside torch-rechub's DSSM on the same data, one run.

    python -m benchmarks.train_throughput [--events 200000] [--epochs 1]

Data: the seeded synthetic generator (jobs.synthetic: power-law item popularity, clustered and
drifting tastes), split leave-last-out by benchmarks.peers.protocol; the training samples are
the train interactions, each with the history of the user's previous 50 items, the user's and
the item's attribute tokens. Both trainers get exactly these samples, batch size 1024 and
embedding/output dimension 64, and are timed over their training loop only (model construction
and data packing excluded), at 1 thread and at every core:

    ours     models.trainer.fit, the default architecture (youtubednn: ID + attributes + decayed
             history), in-batch softmax with logQ correction, AdamW
    peer     torch-rechub DSSM through its MatchTrainer with in-batch negatives (the same loss
             family), towers 256-128-64, user features ID + attributes + mean history

Reported: samples/s of each and ours / peer at each thread count. Writes
benchmarks/out/train_throughput.json. A benchmark reports; it never fails on speed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.peers.protocol import Split, histories, leave_last_out
from benchmarks.peers.report import header, load_line, run_facts

log = logging.getLogger("benchmarks.train_throughput")
OUT = Path(__file__).resolve().parent / "out"
BATCH_SIZE = 1024
DIM = 64
HISTORY_LEN = 50


def synthetic_split(n_events: int, n_users: int, n_items: int, seed: int) -> Split:
    """Seeded synthetic events -> the leave-last-out Split (ids ``u<k>``/``i<k>`` -> idx k + 1)."""
    from jobs.synthetic import SyntheticSpec, generate

    table, user_attrs, item_attrs = generate(SyntheticSpec(n_users=n_users, n_items=n_items, n_events=n_events, seed=seed))
    tokens = {t: j + 1 for j, t in enumerate(sorted({t for a in [*user_attrs.values(), *item_attrs.values()] for t in a}))}

    def attr_table(attrs: dict[str, list[str]], n: int) -> np.ndarray:
        out = np.zeros((n + 1, max(len(a) for a in attrs.values())), np.int64)
        for key, a in attrs.items():
            out[int(key[1:]) + 1, : len(a)] = [tokens[t] for t in a]
        return out

    users = np.char.lstrip(np.asarray(table["user_id"].to_pylist()), "u").astype(np.int64) + 1
    item_ids = np.asarray(table["item_id"].to_pylist())
    items = np.char.lstrip(item_ids, "i").astype(np.int64) + 1
    return leave_last_out(
        users, items, table["ts"].to_numpy(), item_ids, np.asarray(table["event_id"].to_pylist()),
        attr_table(user_attrs, n_users), attr_table(item_attrs, n_items), len(tokens),
    )  # fmt: skip


def ours_samples_per_s(split: Split, threads: int, epochs: int, seed: int) -> dict[str, Any]:
    """The product's fit on the split's train interactions; its own loop timing."""
    import torch

    from models.data import Examples, log_sampling_prob
    from models.features import FeatureTables
    from models.trainer import fit
    from twotower.config import ModelConfig, TrainConfig

    n = len(split.train_items)
    examples = Examples(
        user_idx=split.train_users, item_idx=split.train_items, weight=np.ones(n, np.float32),
        ts=np.zeros(n, np.int64), hist=histories(split.train_users, split.train_items, HISTORY_LEN),
    )  # fmt: skip
    features = FeatureTables(torch.from_numpy(split.user_attrs), torch.from_numpy(split.item_attrs))
    sizes = {"n_users": split.n_users, "n_items": split.n_items, "n_attrs": split.n_attrs, "history_len": HISTORY_LEN}
    model_cfg = ModelConfig(dim=DIM)
    train_cfg = TrainConfig(epochs=epochs, batch_size=BATCH_SIZE, threads=threads, seed=seed)
    result = fit(model_cfg, train_cfg, examples, features, log_sampling_prob(split.item_counts()), sizes)
    return {"samples": n * epochs, "seconds": round(result.seconds, 2), "samples_per_s": round(result.samples_per_s), "threads": result.threads,
            "final_loss": round(result.epoch_loss[-1], 4), "arch": model_cfg.arch}  # fmt: skip


def rechub_samples_per_s(split: Split, threads: int, epochs: int, seed: int) -> dict[str, Any]:
    """torch-rechub DSSM with in-batch negatives on the same samples; MatchTrainer's loop timing."""
    from benchmarks.peers.rechub import RechubConfig, train

    cfg = RechubConfig(dim=DIM, epochs=epochs, batch_size=BATCH_SIZE, history_len=HISTORY_LEN, dssm_loss="inbatch")
    _, seconds, rows = train(split, cfg, "dssm", seed, threads)
    return {"samples": rows, "seconds": round(seconds, 2), "samples_per_s": round(rows / seconds), "threads": threads, "arch": "dssm"}


def run(n_events: int = 200_000, epochs: int = 1, seed: int = 7) -> dict[str, Any]:
    """Both trainers at 1 thread and at every core; the JSON-ready result."""
    from models.trainer import resolve_threads

    n_users, n_items = max(n_events // 40, 100), max(n_events // 100, 100)
    split = synthetic_split(n_events, n_users, n_items, seed)
    log.info("synthetic data: %s events, %s train samples, %s users, %s items", f"{n_events:,}", f"{len(split.train_items):,}", f"{n_users:,}", f"{n_items:,}")
    rows = []
    for threads in sorted({1, resolve_threads(0)}):
        for name, fn in (("ours", ours_samples_per_s), ("torch-rechub DSSM", rechub_samples_per_s)):
            row = {"trainer": name, **fn(split, threads, epochs, seed)}
            log.info("%s at %d thread(s): %s samples/s", name, threads, f"{row['samples_per_s']:,}")
            rows.append(row)
    ratios = {}
    for threads in sorted({r["threads"] for r in rows}):
        by = {r["trainer"]: r["samples_per_s"] for r in rows if r["threads"] == threads}
        ratios[str(threads)] = round(by["ours"] / by["torch-rechub DSSM"], 3)
    return {
        **run_facts("train_throughput"),
        "data": {"source": "jobs.synthetic (seeded: power-law popularity, clustered drifting tastes)", "seed": seed,
                 "events": n_events, "users": n_users, "items": n_items, "train_samples": int(len(split.train_items)),
                 "history_len": HISTORY_LEN},
        "batch_size": BATCH_SIZE,
        "dim": DIM,
        "epochs": epochs,
        "rows": rows,
        "ours_over_rechub_by_threads": ratios,
    }  # fmt: skip


def render(result: dict) -> list[str]:
    """Markdown lines of the training-throughput section of RESULTS.md (pure)."""
    d = result["data"]
    lines = header("Training throughput (samples/s)", result) + [
        f"Same data for both: {d['source']}, seed {d['seed']}, {d['events']:,} events -> {d['train_samples']:,} train samples "
        f"(history of {d['history_len']}), batch {result['batch_size']}, dimension {result['dim']}, {result['epochs']} epoch(s); "
        "training loop only.",
        "",
        "| trainer | threads | samples | seconds | samples/s |",
        "|---|---|---|---|---|",
    ]
    labels = {
        "ours": "ours: models.trainer.fit (youtubednn, in-batch softmax + logQ)",
        "torch-rechub DSSM": "torch-rechub 0.9.0 DSSM, MatchTrainer with in-batch negatives",
    }
    for r in result["rows"]:
        lines.append(f"| {labels.get(r['trainer'], r['trainer'])} | {r['threads']} | {r['samples']:,} | {r['seconds']} | {r['samples_per_s']:,} |")
    ratios = ", ".join(f"{t} thread(s): {v}" for t, v in result["ours_over_rechub_by_threads"].items())
    return lines + ["", f"Ours / torch-rechub DSSM samples/s: {ratios}."] + load_line(result) + [""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_throughput", description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200_000, help="synthetic events generated (train samples are ~97%% of them)")
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args(argv)
    from twotower.logs import setup_logging

    setup_logging()
    result = run(args.events, args.epochs)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "train_throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    print("\n".join(render(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

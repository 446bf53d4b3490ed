"""A tiny prepared partition written straight with pyarrow, for fast model/training tests that
do not need Spark. It follows the "Prepared data" contract in twotower.contracts: stable
1-based vocabularies, train = every interaction but each user's last, eval = the last, hist =
the last L items strictly before the example (oldest first), item_freq over train, _SUCCESS.

Users like one of three item groups (item_idx mod 3), so a model can learn something in one
epoch and tests can compare against chance without flaking.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from twotower.contracts import EXAMPLE_SCHEMA, SUCCESS_MARKER

DAY = "2024-01-30"
DAY_START_MS = 1_706_572_800_000  # 2024-01-30T00:00Z


def write_tiny_prepared(root: Path, n_users: int = 24, n_items: int = 30, history_len: int = 5, seed: int = 0) -> Path:
    """Write ``root/dt=2024-01-30`` and return it."""
    rng = np.random.default_rng(seed)
    out = root / f"dt={DAY}"
    (out / "train").mkdir(parents=True)
    (out / "eval").mkdir()
    tokens = ["age=young", "age=old", "group=0", "group=1", "group=2", "genre=a", "genre=b"]
    n_attrs = len(tokens)
    user_attrs = [[1 + u % 2] for u in range(1, n_users + 1)]
    item_attrs = [[3 + i % 3, 6 + i % 2] for i in range(1, n_items + 1)]

    train: dict[str, list] = {name: [] for name in EXAMPLE_SCHEMA.names}
    evals: dict[str, list] = {name: [] for name in EXAMPLE_SCHEMA.names}
    hist_rows = {"user_idx": [], "hist": [], "hist_ts": [], "hist_event_ids": []}
    for u in range(1, n_users + 1):
        liked = [i for i in range(1, n_items + 1) if i % 3 == u % 3]
        n = int(rng.integers(6, 12))
        items = [int(x) for x in rng.choice(liked, size=min(n, len(liked)), replace=False)]
        ts = [DAY_START_MS + 60_000 * (u * 20 + k) for k in range(len(items))]
        for k, item in enumerate(items):
            split = evals if k == len(items) - 1 else train
            split["user_idx"].append(u)
            split["item_idx"].append(item)
            split["ts"].append(ts[k])
            split["weight"].append(1.0)
            split["hist"].append(items[max(0, k - history_len) : k])
        hist_rows["user_idx"].append(u)
        hist_rows["hist"].append(items[-history_len:])
        hist_rows["hist_ts"].append(ts[-history_len:])
        hist_rows["hist_event_ids"].append([f"e{u}-{k}" for k in range(len(items))][-history_len:])

    def idx(n: int) -> pa.Array:
        return pa.array(range(1, n + 1), pa.int32())

    pq.write_table(pa.table({"user_id": [f"u{u}" for u in range(1, n_users + 1)], "idx": idx(n_users)}), out / "vocab_users.parquet")
    pq.write_table(pa.table({"item_id": [f"i{i}" for i in range(1, n_items + 1)], "idx": idx(n_items)}), out / "vocab_items.parquet")
    pq.write_table(pa.table({"token": tokens, "idx": idx(n_attrs)}), out / "vocab_attrs.parquet")
    pq.write_table(
        pa.table({"user_idx": idx(n_users), "user_id": [f"u{u}" for u in range(1, n_users + 1)],
                  "attrs": pa.array(user_attrs, pa.list_(pa.int32()))}),
        out / "users.parquet",
    )  # fmt: skip
    pq.write_table(
        pa.table({"item_idx": idx(n_items), "item_id": [f"i{i}" for i in range(1, n_items + 1)],
                  "attrs": pa.array(item_attrs, pa.list_(pa.int32()))}),
        out / "items.parquet",
    )  # fmt: skip
    pq.write_table(pa.table(train, schema=EXAMPLE_SCHEMA), out / "train" / "part-00000.parquet")
    pq.write_table(pa.table(evals, schema=EXAMPLE_SCHEMA), out / "eval" / "part-00000.parquet")
    counts = np.bincount(np.array(train["item_idx"]), minlength=n_items + 1)[1:]
    pq.write_table(
        pa.table({"item_idx": idx(n_items), "count": pa.array(counts, pa.int64()), "prob": counts / counts.sum()}),
        out / "item_freq.parquet",
    )
    pq.write_table(
        pa.table(hist_rows, schema=pa.schema([("user_idx", pa.int32()), ("hist", pa.list_(pa.int32())),
                                              ("hist_ts", pa.list_(pa.int64())), ("hist_event_ids", pa.list_(pa.string()))])),
        out / "user_history.parquet",
    )  # fmt: skip
    manifest = {
        "schema_version": 1, "logical_date": DAY, "window_days": 1, "window_start_ms": DAY_START_MS,
        "data_cutoff_ms": DAY_START_MS + 86_400_000, "history_len": history_len,
        "n_events": len(train["item_idx"]) + len(evals["item_idx"]), "n_users": n_users, "n_items": n_items,
        "n_attrs": n_attrs, "n_train": len(train["item_idx"]), "n_eval": len(evals["item_idx"]),
        "raw_partitions": [f"dt={DAY}"],
    }  # fmt: skip
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    (out / SUCCESS_MARKER).write_text("")
    return out

"""Training and evaluation examples from the prepared Parquet (twotower.contracts).

Examples are read with pyarrow in record batches and packed into flat numpy arrays (a history
becomes a fixed-width row), so memory is the packed arrays, not Arrow's per-row lists. That
holds comfortably up to tens of millions of examples; beyond that the same reader feeds a
shuffle buffer per worker instead of one in-memory permutation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow.parquet as pq

from models.features import padded_lists
from twotower.contracts import SUCCESS_MARKER

READ_BATCH_ROWS = 65_536


@dataclass(frozen=True)
class Examples:
    """N examples: ``user_idx[N]``, ``item_idx[N]`` (int64), ``weight[N]`` (float32),
    ``ts[N]`` (int64 epoch ms) and ``hist[N, L]`` (int64, 0-padded, oldest first)."""

    user_idx: np.ndarray
    item_idx: np.ndarray
    weight: np.ndarray
    ts: np.ndarray
    hist: np.ndarray

    def __len__(self) -> int:
        return len(self.item_idx)


def split_files(prepared_dir: Path, split: str) -> list[Path]:
    """The Parquet files of ``train`` or ``eval``, in name order (a stable read order)."""
    files = sorted((Path(prepared_dir) / split).glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no {split} Parquet files under {Path(prepared_dir) / split}")
    return files


def read_examples(prepared_dir: Path, split: str, history_len: int) -> Examples:
    """All examples of a split, read in record batches of READ_BATCH_ROWS rows."""
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("user_idx", "item_idx", "weight", "ts", "hist")}
    for path in split_files(prepared_dir, split):
        for batch in pq.ParquetFile(path).iter_batches(batch_size=READ_BATCH_ROWS):
            cols["user_idx"].append(batch.column("user_idx").to_numpy().astype(np.int64))
            cols["item_idx"].append(batch.column("item_idx").to_numpy().astype(np.int64))
            weight = batch.column("weight").to_numpy(zero_copy_only=False)
            cols["weight"].append(np.nan_to_num(weight.astype(np.float32), nan=1.0))
            cols["ts"].append(batch.column("ts").to_numpy().astype(np.int64))
            cols["hist"].append(padded_lists(batch.column("hist"), history_len))
    if not cols["item_idx"]:
        return Examples(*(np.zeros(0, np.int64) for _ in range(4)), np.zeros((0, history_len), np.int64))
    return Examples(**{k: np.concatenate(v) for k, v in cols.items()})


def read_pairs(prepared_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Only ``(user_idx, item_idx)`` of a split (int64 arrays): what "seen" sets need."""
    users, items = [], []
    for path in split_files(prepared_dir, split):
        for batch in pq.ParquetFile(path).iter_batches(batch_size=READ_BATCH_ROWS, columns=["user_idx", "item_idx"]):
            users.append(batch.column("user_idx").to_numpy().astype(np.int64))
            items.append(batch.column("item_idx").to_numpy().astype(np.int64))
    if not users:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(users), np.concatenate(items)


def read_item_counts(prepared_dir: Path, n_items: int) -> np.ndarray:
    """Train-split interaction count per item, ``int64 [n_items + 1]`` indexed by item_idx (row 0 = 0)."""
    table = pq.read_table(Path(prepared_dir) / "item_freq.parquet", columns=["item_idx", "count"])
    counts = np.zeros(n_items + 1, dtype=np.int64)
    counts[table["item_idx"].to_numpy().astype(np.int64)] = table["count"].to_numpy()
    return counts


def log_sampling_prob(counts: np.ndarray) -> np.ndarray:
    """log p_i of drawing item i as a training target, ``float32 [n_items + 1]``.

    Items never trained on (count 0) never appear as in-batch negatives, so their value is
    never used; they get the smallest observed probability to stay finite.
    """
    total = max(int(counts.sum()), 1)
    floor = counts[counts > 0].min() if (counts > 0).any() else 1
    return np.log(np.maximum(counts, floor) / total).astype(np.float32)


def read_manifest(prepared_dir: Path) -> dict:
    """The prepared partition's manifest; refuses a partition without its success marker."""
    prepared_dir = Path(prepared_dir)
    if not (prepared_dir / SUCCESS_MARKER).exists():
        raise FileNotFoundError(
            f"prepared partition {prepared_dir} is incomplete or missing (no {SUCCESS_MARKER}); run prepare for that date first"
        )
    return json.loads((prepared_dir / "manifest.json").read_text())


def shuffled_batches(n: int, batch_size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Index arrays of one epoch in a seeded random order; the last batch may be smaller."""
    order = rng.permutation(n)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]

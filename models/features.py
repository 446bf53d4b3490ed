"""Padded id tensors for the towers, built from the prepared / artifact Parquet tables.

The towers take 0-padded LongTensors: attributes ``[N, A]`` and histories ``[N, L]``. The
training job, the evaluator, the incremental updater and the serving layer all build them with
these helpers, so every path feeds the model the same way.

Layout chosen here: a list is written left-aligned, oldest first, zeros after it; a list longer
than the width keeps its LAST ``width`` entries (for histories: the most recent items).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch


def padded_lists(lists: pa.Array | pa.ChunkedArray, width: int) -> np.ndarray:
    """``list<int>`` Arrow column -> ``int64 [N, width]``, left-aligned, 0-padded, last ``width`` kept.

    Vectorised over the flat values: no Python loop per row. Null lists are empty.
    """
    if isinstance(lists, pa.ChunkedArray):
        lists = lists.combine_chunks() if lists.num_chunks else pa.array([], lists.type)
    n = len(lists)
    out = np.zeros((n, max(width, 0)), dtype=np.int64)
    if n == 0 or width <= 0:
        return out
    lists = pc.fill_null(lists, pa.scalar([], lists.type))
    lengths = pc.list_value_length(lists).to_numpy(zero_copy_only=False).astype(np.int64)
    values = pc.list_flatten(lists).to_numpy(zero_copy_only=False).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    keep = np.minimum(lengths, width)
    first = starts + lengths - keep  # first kept value of each row
    rows = np.repeat(np.arange(n), keep)
    cols = np.arange(keep.sum()) - np.repeat(np.cumsum(keep) - keep, keep)
    out[rows, cols] = values[np.repeat(first, keep) + cols]
    return out


def history_tensor(histories: Sequence[Sequence[int]], width: int) -> torch.Tensor:
    """Python lists of item_idx (oldest first) -> ``LongTensor [N, width]`` in the same layout."""
    return torch.from_numpy(padded_lists(pa.array([list(h) for h in histories], pa.list_(pa.int64())), width))


def attr_table(path: Path, key: str) -> np.ndarray:
    """``users.parquet`` / ``items.parquet`` -> ``int64 [max_idx + 1, A]`` indexed by idx.

    Row 0 (and any idx without a row) is all padding. A is the longest attribute list (>= 1).
    """
    table = pq.read_table(path, columns=[key, "attrs"])
    idx = table[key].to_numpy().astype(np.int64)
    n_rows = int(idx.max()) + 1 if len(idx) else 1
    lengths = pc.list_value_length(pc.fill_null(table["attrs"], pa.scalar([], table["attrs"].type)))
    width = max(int(pc.max(lengths).as_py() or 0), 1)
    out = np.zeros((n_rows, width), dtype=np.int64)
    out[idx] = padded_lists(table["attrs"], width)
    return out


@dataclass(frozen=True)
class FeatureTables:
    """Attribute tables indexed by vocabulary index: ``user_attrs[n_users + 1, Au]``,
    ``item_attrs[n_items + 1, Ai]`` (LongTensors, row 0 = padding / unknown)."""

    user_attrs: torch.Tensor
    item_attrs: torch.Tensor

    def users(self, user_idx: torch.Tensor) -> torch.Tensor:
        """Attributes of ``user_idx[B]``; an index past the table (a user newer than the table) gets none."""
        ok = user_idx < len(self.user_attrs)
        return self.user_attrs[torch.where(ok, user_idx, torch.zeros_like(user_idx))]

    def items(self, item_idx: torch.Tensor) -> torch.Tensor:
        """Attributes of ``item_idx[N]``."""
        return self.item_attrs[item_idx]


def load_feature_tables(directory: Path, n_users: int | None = None, n_items: int | None = None) -> FeatureTables:
    """Feature tables from a prepared partition or an artifact directory (both hold
    ``users.parquet`` and ``items.parquet``), padded to the vocabulary sizes when given."""
    directory = Path(directory)
    users = attr_table(directory / "users.parquet", "user_idx")
    items = attr_table(directory / "items.parquet", "item_idx")
    users = _pad_rows(users, n_users)
    items = _pad_rows(items, n_items)
    return FeatureTables(torch.from_numpy(users), torch.from_numpy(items))


def _pad_rows(table: np.ndarray, n: int | None) -> np.ndarray:
    if n is None or len(table) >= n + 1:
        return table
    return np.vstack([table, np.zeros((n + 1 - len(table), table.shape[1]), dtype=table.dtype)])

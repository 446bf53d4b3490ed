"""Non-learned recall baselines, ranked under the same protocol as the model (jobs.evaluate).

A model that does not clearly beat "recommend the most popular items the user has not seen"
is not worth serving; the evaluator reports this beside every version.
"""

from __future__ import annotations

import numpy as np

from models.ranking import CHUNK_USERS, mask_and_topk


def popularity_topk(item_counts: np.ndarray, seen: list[np.ndarray], k: int) -> np.ndarray:
    """Top-``k`` item_idx per user by train-split popularity, the user's seen items excluded.

    item_counts  int [n_items + 1], train interactions per item_idx (row 0 = padding, never ranked)
    seen         per user, the item_idx to exclude
    Returns int64 [U, min(k, n_items)]; equal counts go to the smaller item_idx.
    """
    scores = item_counts[1:].astype(np.float64)
    out = [
        mask_and_topk(np.tile(scores, (len(seen[s : s + CHUNK_USERS]), 1)), seen[s : s + CHUNK_USERS], k)
        for s in range(0, len(seen), CHUNK_USERS)
    ]
    return np.concatenate(out) if out else np.zeros((0, min(k, len(scores))), dtype=np.int64)

"""Full-corpus top-k ranking with seen items excluded. Pure numpy; shared by the evaluator
and the baselines so the model and its peers are ranked the same way.

Item vectors and scores follow the artifact layout: item_idx 1..n_items, row/column 0 is the
padding item and is never returned.
"""

from __future__ import annotations

import numpy as np

CHUNK_USERS = 1024  # users scored at once: bounds memory at CHUNK_USERS x n_items floats


def mask_and_topk(scores: np.ndarray, seen: list[np.ndarray], k: int) -> np.ndarray:
    """Top-``k`` item_idx per row of ``scores[C, n_items]`` (column j = item_idx j + 1).

    ``scores`` is modified in place (seen items set to -inf). Order: score descending, then
    item_idx ascending. A slot with nothing left to recommend (the user saw nearly every item)
    holds 0, which matches no target. Returns int64 [C, min(k, n_items)].
    """
    n_rows, n_items = scores.shape
    k = min(k, n_items)
    for row, items in enumerate(seen):
        if len(items):
            scores[row, np.asarray(items, dtype=np.int64) - 1] = -np.inf
    if k == 0:
        return np.zeros((n_rows, 0), dtype=np.int64)
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < n_items else np.tile(np.arange(n_items), (n_rows, 1))
    part_scores = np.take_along_axis(scores, part, axis=1)
    order = np.lexsort((part, -part_scores), axis=1)
    top = np.take_along_axis(part, order, axis=1)
    top_scores = np.take_along_axis(part_scores, order, axis=1)
    return np.where(np.isneginf(top_scores), 0, top + 1).astype(np.int64)


def exact_topk(user_vecs: np.ndarray, item_vecs: np.ndarray, seen: list[np.ndarray], k: int) -> np.ndarray:
    """Exact inner-product top-``k`` over the whole corpus, seen items excluded.

    user_vecs  float32 [U, d]; item_vecs float32 [n_items + 1, d] (row 0 = padding);
    seen       per user, item_idx to exclude. Returns int64 [U, min(k, n_items)].
    """
    out = []
    for start in range(0, len(user_vecs), CHUNK_USERS):
        scores = user_vecs[start : start + CHUNK_USERS] @ item_vecs[1:].T
        out.append(mask_and_topk(scores, seen[start : start + CHUNK_USERS], k))
    return np.concatenate(out) if out else np.zeros((0, min(k, len(item_vecs) - 1)), dtype=np.int64)

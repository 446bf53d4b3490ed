"""Item-based k-nearest-neighbours with cosine similarity (the classic ItemKNN peer). Pure numpy/scipy.

    X        binary user x item train matrix
    S[i, j]  = |users(i) ∩ users(j)| / sqrt(|users(i)| · |users(j)|), S[i, i] = 0
    prune    each item i keeps its ``k`` most similar items j (row-wise, as implicit's
             ItemItemRecommender does); ties go to the smaller item index
    score    score(u, j) = Σ_{i ∈ items(u)} S[i, j]    (= X[u] @ S)
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from benchmarks.peers.protocol import TOP_K, Split, topk_from_scores


def cosine_similarity(user_items: sp.spmatrix) -> sp.csr_matrix:
    """Item-item cosine similarity ``float64 [n_items, n_items]`` of a binary ``[users, items]``
    matrix, zero diagonal; items with no interactions have all-zero rows and columns."""
    x = sp.csr_matrix(user_items, dtype=np.float64)
    x.data[:] = 1.0
    co = (x.T @ x).tocsr()
    norms = np.sqrt(co.diagonal())
    inv = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
    sim = sp.diags(inv) @ co @ sp.diags(inv)
    sim = sp.csr_matrix(sim)
    sim.setdiag(0.0)
    sim.eliminate_zeros()
    return sim


def keep_top_neighbours(sim: sp.csr_matrix, k: int) -> sp.csr_matrix:
    """Each row keeps its ``k`` largest entries (ties: smaller column first); ``k <= 0`` keeps all."""
    sim = sp.csr_matrix(sim)
    if k <= 0:
        return sim
    rows, cols, vals = [], [], []
    for i in range(sim.shape[0]):
        start, stop = sim.indptr[i], sim.indptr[i + 1]
        c, v = sim.indices[start:stop], sim.data[start:stop]
        if len(c) > k:
            keep = np.lexsort((c, -v))[:k]
            c, v = c[keep], v[keep]
        rows.append(np.full(len(c), i))
        cols.append(c)
        vals.append(v)
    return sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=sim.shape)


def itemknn_topk(split: Split, neighbours: int, k: int = TOP_K) -> np.ndarray:
    """Top-``k`` item_idx ``[U, k]`` for the eval users of ``split`` (seen items excluded)."""
    x = split.user_items()[:, 1:]  # item_idx j -> column j - 1, as models.ranking expects
    sim = keep_top_neighbours(cosine_similarity(x), neighbours)
    rows = x[split.eval_users]
    return topk_from_scores(lambda s, e: (rows[s:e] @ sim).toarray(), split, k)

"""Matrix-factorisation peers from the ``implicit`` package (0.7.x, CPU): ALS and BPR.

Both are fitted on the Split's binary train matrix without its padding row and column, and
ranked through the shared protocol from their factors: score(u, i) = <user_factors[u],
item_factors[i]> (BPR's item bias is one of its factor columns, paired with a constant 1 in
the user factors, so the dot product includes it).

DESIGN §9 settings: ALS factors 32, regularization 0.1, alpha 10, 20 iterations; BPR factors
128, 200 iterations (implicit's defaults for the rest: learning rate 0.01, regularization 0.01).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from benchmarks.peers.protocol import TOP_K, Split, topk_from_vectors


@dataclass(frozen=True)
class AlsConfig:
    factors: int = 32
    regularization: float = 0.1
    alpha: float = 10.0
    iterations: int = 20


@dataclass(frozen=True)
class BprConfig:
    factors: int = 128
    iterations: int = 200
    learning_rate: float = 0.01
    regularization: float = 0.01


def _padded(factors: np.ndarray) -> np.ndarray:
    """Factors of idx 1..n -> ``[n + 1, f]`` with a zero padding row 0 (the Split's layout)."""
    return np.vstack([np.zeros((1, factors.shape[1]), factors.dtype), factors])


def fit_factors(model, split: Split) -> tuple[np.ndarray, np.ndarray, float]:
    """Fit an implicit model on the train matrix; (user factors [n_users + 1, f], item factors
    [n_items + 1, f], fit seconds)."""
    matrix = split.user_items()[1:, 1:].tocsr()
    t0 = time.perf_counter()
    model.fit(matrix, show_progress=False)
    seconds = time.perf_counter() - t0
    users, items = (np.asarray(getattr(model, name)) for name in ("user_factors", "item_factors"))
    return _padded(users), _padded(items), seconds


def als_topk(split: Split, cfg: AlsConfig, seed: int, threads: int, k: int = TOP_K) -> tuple[np.ndarray, dict]:
    """Top-``k`` ``[U, k]`` of implicit's AlternatingLeastSquares, and what was run."""
    from implicit.cpu.als import AlternatingLeastSquares

    model = AlternatingLeastSquares(**asdict(cfg), num_threads=threads, random_state=seed)
    users, items, seconds = fit_factors(model, split)
    return topk_from_vectors(users[split.eval_users], items, split, k), {"config": asdict(cfg), "fit_seconds": round(seconds, 2)}


def bpr_topk(split: Split, cfg: BprConfig, seed: int, threads: int, k: int = TOP_K) -> tuple[np.ndarray, dict]:
    """Top-``k`` ``[U, k]`` of implicit's BayesianPersonalizedRanking, and what was run."""
    from implicit.cpu.bpr import BayesianPersonalizedRanking

    model = BayesianPersonalizedRanking(**asdict(cfg), num_threads=threads, random_state=seed)
    users, items, seconds = fit_factors(model, split)
    return topk_from_vectors(users[split.eval_users], items, split, k), {"config": asdict(cfg), "fit_seconds": round(seconds, 2)}

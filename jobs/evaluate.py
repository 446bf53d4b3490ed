"""Offline evaluation of a model version (DESIGN §4, §9): full-corpus ranking, no sampling.

Protocol: one query per row of the prepared eval split (each user's last interaction in the
window). The user vector is built from the user's ID row, attributes and the history before
the held-out item; every item of the corpus is scored, the items the user interacted with in
the train split are excluded, and the held-out item's rank gives hit@K / recall@K (K = 10, 50,
100) and NDCG@10. The popularity baseline is ranked the same way in the same run.

With one held-out item per user, recall@K equals hit@K; both are reported because the index
job and dashboards compare them by name.
"""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.data import read_examples, read_item_counts, read_pairs
from models.features import load_feature_tables
from models.ranking import exact_topk
from models.towers import load_model
from twotower.config import Settings
from twotower.contracts import ARTIFACT_FILES

log = logging.getLogger(__name__)

KS = (10, 50, 100)
METRIC_KEYS = ("hit@10", "hit@50", "hit@100", "recall@10", "recall@50", "recall@100", "ndcg@10")
QUERY_BATCH = 4096


def metrics_from_topk(topk_item_idx: np.ndarray, target_item_idx: np.ndarray) -> dict[str, float]:
    """Ranking metrics of top-k lists against one held-out item per user. Pure.

    topk_item_idx    int [U, K], best first (K >= 100 for exact @100; a shorter list counts
                     what it holds)
    target_item_idx  int [U]
    Returns METRIC_KEYS -> mean over users. NDCG@10 = 1 / log2(rank + 2) for a hit at
    0-based rank < 10, else 0 (one relevant item, so the ideal DCG is 1).
    """
    topk = np.asarray(topk_item_idx)
    targets = np.asarray(target_item_idx).reshape(-1)
    if topk.ndim != 2 or len(topk) != len(targets):
        raise ValueError(f"topk must be [U, K] with U = len(targets); got {topk.shape} and {targets.shape}")
    if len(targets) == 0:
        raise ValueError("no evaluation queries: the eval split is empty")
    match = topk == targets[:, None]
    rank = np.where(match.any(axis=1), match.argmax(axis=1), np.iinfo(np.int64).max)
    out: dict[str, float] = {}
    for k in KS:
        hit = float(np.mean(rank < k))
        out[f"hit@{k}"] = hit
        out[f"recall@{k}"] = hit  # one relevant item per user
    gains = np.where(rank < 10, 1.0 / np.log2(np.minimum(rank, 10) + 2.0), 0.0)
    out["ndcg@10"] = float(np.mean(gains))
    return {k: out[k] for k in METRIC_KEYS}


def seen_items(users: np.ndarray, items: np.ndarray, query_users: np.ndarray) -> list[np.ndarray]:
    """For each query user, the distinct item_idx they have in (users, items). Pure."""
    order = np.lexsort((items, users))
    users, items = users[order], items[order]
    starts = np.searchsorted(users, query_users, side="left")
    ends = np.searchsorted(users, query_users, side="right")
    return [np.unique(items[s:e]) for s, e in zip(starts, ends)]


@torch.no_grad()
def eval_queries(artifact_dir: Path, prepared_dir: Path) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """The evaluation queries of a version on a prepared partition.

    Returns (user_vecs float32 [U, d], targets int64 [U], seen: per query the item_idx of the
    user's train examples, to exclude). Row u of each belongs to eval row u.
    """
    model = load_model(artifact_dir)
    features = load_feature_tables(artifact_dir, model.n_users, model.n_items)
    queries = read_examples(prepared_dir, "eval", model.history_len)
    train_users, train_items = read_pairs(prepared_dir, "train")
    vecs = []
    for start in range(0, len(queries), QUERY_BATCH):
        users = torch.from_numpy(queries.user_idx[start : start + QUERY_BATCH])
        hist = torch.from_numpy(queries.hist[start : start + QUERY_BATCH])
        vecs.append(model.user_vectors(users, features.users(users), hist).numpy())
    user_vecs = np.concatenate(vecs).astype(np.float32) if vecs else np.zeros((0, model.cfg.dim), np.float32)
    return user_vecs, queries.item_idx, seen_items(train_users, train_items, queries.user_idx)


def evaluate_exact(settings: Settings, artifact_dir: Path, prepared_dir: Path) -> dict[str, Any]:
    """Exact-search metrics of the version and of the popularity baseline; writes metrics.json.

    metrics.json gets {"exact": {...}, "baselines": {"popularity": {...}}, "n_eval_users": U};
    other keys already there (the index job's "ann") are kept.
    """
    from jobs.baselines import popularity_topk

    artifact_dir, prepared_dir = Path(artifact_dir), Path(prepared_dir)
    user_vecs, targets, seen = eval_queries(artifact_dir, prepared_dir)
    item_vecs = np.load(artifact_dir / ARTIFACT_FILES["item_embeddings"])
    k = max(KS)
    exact = metrics_from_topk(exact_topk(user_vecs, item_vecs, seen, k), targets)
    counts = read_item_counts(prepared_dir, len(item_vecs) - 1)
    popularity = metrics_from_topk(popularity_topk(counts, seen, k), targets)
    result = {"exact": exact, "baselines": {"popularity": popularity}, "n_eval_users": int(len(targets))}
    log.info(
        "version %s, exact search over %s items for %s eval users: hit@10 %.3f, hit@50 %.3f, hit@100 %.3f, "
        "ndcg@10 %.3f (popularity baseline: hit@10 %.3f, hit@50 %.3f)",
        artifact_dir.name, f"{len(item_vecs) - 1:,}", f"{len(targets):,}", exact["hit@10"], exact["hit@50"],
        exact["hit@100"], exact["ndcg@10"], popularity["hit@10"], popularity["hit@50"],
    )  # fmt: skip
    write_metrics(artifact_dir, result)
    return result


def write_metrics(artifact_dir: Path, updates: dict[str, Any]) -> dict[str, Any]:
    """Merge ``updates`` into the artifact's metrics.json (atomic replace); returns the whole file."""
    path = Path(artifact_dir) / ARTIFACT_FILES["metrics"]
    current = json.loads(path.read_text()) if path.exists() else {}
    current.update(updates)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(current, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return current

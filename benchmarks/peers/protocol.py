"""The DESIGN §9 protocol as one shared split, and the one way every peer is ranked and scored.

    events (user_idx, item_idx, ts, item_id) --leave_last_out--> Split
        train:  every interaction except each user's last (users with one event keep it here)
        eval:   each user's last interaction, for users with >= 2 events
        order:  a user's events sorted by (ts, len(item_id), item_id, event_id): a same-second tie
                breaks by item id numerically for numeric ids, exactly as the product's Spark
                prepare job orders them (jobs.prepare_transform.event_order)
    Split --peer--> scores [U, n_items] or (user vectors, item vectors)
          --models.ranking (seen train items excluded, full corpus)--> top-k
          --jobs.evaluate.metrics_from_topk--> hit@10/50/100, NDCG@10

Indices follow the product's layout: user_idx 1..n_users, item_idx 1..n_items, 0 is padding.
Everything here is pure numpy/scipy; reading files is the caller's job.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import scipy.sparse as sp

from jobs.evaluate import KS, metrics_from_topk, seen_items
from models.ranking import CHUNK_USERS, exact_topk, mask_and_topk

TOP_K = max(KS)
"""Length of every ranked list (hit@100 needs 100)."""


@dataclass(frozen=True)
class Split:
    """One leave-last-out split that every model of a benchmark run sees.

    train_users, train_items  int64 [N], grouped by user (ascending) and in each user's event order
    eval_users, eval_items    int64 [U], one held-out item per user, users ascending
    user_attrs                int64 [n_users + 1, Au], 0-padded attribute tokens (row 0 empty)
    item_attrs                int64 [n_items + 1, Ai], same vocabulary of tokens as user_attrs
    n_users, n_items, n_attrs vocabulary sizes (excluding padding)
    """

    n_users: int
    n_items: int
    n_attrs: int
    train_users: np.ndarray
    train_items: np.ndarray
    eval_users: np.ndarray
    eval_items: np.ndarray
    user_attrs: np.ndarray
    item_attrs: np.ndarray
    _seen: list[np.ndarray] = field(default_factory=list, repr=False, compare=False)

    @property
    def seen(self) -> list[np.ndarray]:
        """Per eval user, the distinct item_idx of their train interactions (excluded from ranking)."""
        if not self._seen:
            self._seen.extend(seen_items(self.train_users, self.train_items, self.eval_users))
        return self._seen

    def user_items(self) -> sp.csr_matrix:
        """Binary train matrix ``float32 [n_users + 1, n_items + 1]`` (row/column 0 empty)."""
        shape = (self.n_users + 1, self.n_items + 1)
        data = np.ones(len(self.train_users), dtype=np.float32)
        matrix = sp.csr_matrix((data, (self.train_users, self.train_items)), shape=shape)
        matrix.data[:] = 1.0  # a repeated (user, item) pair is still one positive
        return matrix

    def item_counts(self) -> np.ndarray:
        """Train interactions per item_idx, ``int64 [n_items + 1]`` (the popularity baseline's input)."""
        return np.bincount(self.train_items, minlength=self.n_items + 1).astype(np.int64)


def event_order(user_idx: np.ndarray, ts: np.ndarray, item_ids: np.ndarray, event_ids: np.ndarray) -> np.ndarray:
    """Permutation sorting events by user, then (ts, len(item_id), item_id, event_id). Pure."""
    item_ids = np.asarray(item_ids).astype(str)
    lengths = np.char.str_len(item_ids)
    return np.lexsort((np.asarray(event_ids).astype(str), item_ids, lengths, np.asarray(ts), np.asarray(user_idx)))


def leave_last_out(
    user_idx: np.ndarray,
    item_idx: np.ndarray,
    ts: np.ndarray,
    item_ids: np.ndarray,
    event_ids: np.ndarray,
    user_attrs: np.ndarray,
    item_attrs: np.ndarray,
    n_attrs: int,
) -> Split:
    """The DESIGN §9 split of a set of events (one row per event, already deduplicated). Pure.

    user_idx, item_idx  int [E] vocabulary indices (>= 1)
    ts                  int [E] event time (any unit; only the order matters)
    item_ids, event_ids raw string ids, for the tie order
    user_attrs, item_attrs  0-padded token tables indexed by idx; their row counts give n_users + 1
                        and n_items + 1, so items nobody interacted with are still ranked
    """
    order = event_order(user_idx, ts, item_ids, event_ids)
    users = np.asarray(user_idx, dtype=np.int64)[order]
    items = np.asarray(item_idx, dtype=np.int64)[order]
    last = np.r_[users[1:] != users[:-1], True] if len(users) else np.zeros(0, bool)
    first = np.r_[True, users[1:] != users[:-1]] if len(users) else np.zeros(0, bool)
    is_eval = last & ~first  # a user's last event, when the user has at least two
    n_users, n_items = len(user_attrs) - 1, len(item_attrs) - 1
    if len(users) and (users.max() > n_users or items.max() > n_items or users.min() < 1 or items.min() < 1):
        raise ValueError("event indices must lie in 1..n_users / 1..n_items of the attribute tables")
    return Split(
        n_users=n_users,
        n_items=n_items,
        n_attrs=int(n_attrs),
        train_users=users[~is_eval],
        train_items=items[~is_eval],
        eval_users=users[is_eval],
        eval_items=items[is_eval],
        user_attrs=np.asarray(user_attrs, dtype=np.int64),
        item_attrs=np.asarray(item_attrs, dtype=np.int64),
    )


def split_differences(split: Split, train: tuple[np.ndarray, np.ndarray], evaluation: tuple[np.ndarray, np.ndarray]) -> list[str]:
    """How ``split`` differs from another split's (user_idx, item_idx) pairs; [] when identical. Pure.

    Used to prove the peers' split is the product's prepared split, pair for pair.
    """

    def pairs(users: np.ndarray, items: np.ndarray) -> np.ndarray:
        key = np.asarray(users, dtype=np.int64) * (split.n_items + 1) + np.asarray(items, dtype=np.int64)
        return np.sort(key)

    out = []
    for name, mine, theirs in (
        ("train", pairs(split.train_users, split.train_items), pairs(*train)),
        ("eval", pairs(split.eval_users, split.eval_items), pairs(*evaluation)),
    ):
        if len(mine) != len(theirs):
            out.append(f"{name}: {len(mine)} pairs here, {len(theirs)} there")
        elif not np.array_equal(mine, theirs):
            out.append(f"{name}: {int((mine != theirs).sum())} of {len(mine)} pairs differ")
    return out


def histories(users: np.ndarray, items: np.ndarray, width: int) -> np.ndarray:
    """History of each interaction: the item_idx of the user's ``width`` previous ones. Pure.

    ``users``/``items`` int [N] grouped by user in event order (as Split.train_*). Returns int64
    [N, width], oldest first, left-aligned, 0-padded (the product's layout, models.features).
    """
    users = np.asarray(users, dtype=np.int64)
    items = np.asarray(items, dtype=np.int64)
    n = len(users)
    if n == 0:
        return np.zeros((0, width), dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    pos = np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))  # events before this one
    kept = np.minimum(pos, width)
    cols = np.arange(width)[None, :]
    src = np.arange(n)[:, None] - kept[:, None] + cols
    return np.where(cols < kept[:, None], items[np.clip(src, 0, n - 1)], 0)


def eval_histories(split: Split, width: int) -> np.ndarray:
    """History of each eval query: the user's last ``width`` train items, oldest first, ``[U, width]``."""
    users = np.r_[split.train_users, split.eval_users]
    items = np.r_[split.train_items, split.eval_items]
    order = np.argsort(users, kind="stable")  # eval rows go after the user's train rows
    hist = histories(users[order], items[order], width)
    is_eval = np.zeros(len(users), bool)
    is_eval[len(split.train_users) :] = True
    return hist[is_eval[order]]


def topk_from_scores(score_chunk: Callable[[int, int], np.ndarray], split: Split, k: int = TOP_K) -> np.ndarray:
    """Top-``k`` item_idx ``[U, k]`` for the eval users from a scorer, seen items excluded.

    ``score_chunk(start, stop)`` returns float scores ``[stop - start, n_items]`` for eval rows
    start..stop (column j = item_idx j + 1). Ranking is models.ranking.mask_and_topk, as for the
    product: score descending, then item_idx ascending.
    """
    seen = split.seen
    out = [
        mask_and_topk(np.array(score_chunk(s, min(s + CHUNK_USERS, len(seen))), dtype=np.float64), seen[s : s + CHUNK_USERS], k)
        for s in range(0, len(seen), CHUNK_USERS)
    ]
    return np.concatenate(out) if out else np.zeros((0, min(k, split.n_items)), dtype=np.int64)


def topk_from_vectors(user_vecs: np.ndarray, item_vecs: np.ndarray, split: Split, k: int = TOP_K) -> np.ndarray:
    """Top-``k`` by inner product: ``user_vecs[U, d]`` (eval rows), ``item_vecs[n_items + 1, d]`` (row 0 padding)."""
    if len(item_vecs) != split.n_items + 1:
        raise ValueError(f"item_vecs must have n_items + 1 = {split.n_items + 1} rows, got {len(item_vecs)}")
    return exact_topk(np.ascontiguousarray(user_vecs, np.float32), np.ascontiguousarray(item_vecs, np.float32), split.seen, k)


def evaluate(topk: np.ndarray, split: Split) -> dict[str, float]:
    """hit@10/50/100, recall@K and NDCG@10 of ``topk[U, k]`` against the held-out items."""
    return metrics_from_topk(topk, split.eval_items)

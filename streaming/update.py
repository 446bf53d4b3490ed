"""The hourly update rule: a few Adagrad steps on user-ID rows only (DESIGN §5). Arrays in, rows out.

Objective. For each touched user u with positives P_u (the known items of u's events in the
hour, weights w_e normalised to sum to 1 per user):

    loss = sum_u  - sum_{e in P_u} w_e * log softmax_{i in P_u + S_u}( s_ui )[item_e]
    s_ui = <f(row_u, attrs_u, hist_u), v_i> / tau  (+ log(N / C) for i in S_u)

f is the frozen user tower with the Redis row injected in place of the ID lookup
(``TwoTower.user_vectors_from_rows``), v_i the frozen item vectors of the version (the
``item_embeddings.npy`` that the index serves). S_u is the hour's negative sample minus u's own
positives: C = ``IncrementalConfig.negatives`` items (512) shared by every user of the hour, with
the log(N / C) correction that makes the sampled partition function estimate the full one (a
uniform sample, so the logQ term is that constant). With C >= N (or C = 0) S_u is the rest of
the corpus, i.e. the plain full softmax over the N items, without correction.

Why a fixed sample per hour and not the in-batch negatives of training: an hour touches few
users, so in-batch negatives would be a handful of items chosen by who happened to be active,
and they would change when a crash splits the hour differently. The sample is a window of C
consecutive entries of a seeded permutation of the corpus, made once per version
(``RowUpdateArrays``): hour h starts at (h * C) mod N and wraps. Every attempt at an hour reads the same window; it
costs O(C) per hour, not a permutation of the corpus; over consecutive hours the windows sweep
the permutation, so every item is a negative in the same share C / N of the hours, which is
what the correction assumes.

Only the rows move. The arithmetic is numpy float32 on read-only copies of the frozen weights
(``models.towers.UserTowerArrays``: the user tower with its row backward written out; the
softmax's gradient is closed-form, (p - w) . V / tau), so the model's parameters stay bitwise
unchanged (tests check it). An hour of one or two users is ~100 small array ops, whose cost is
per op: about 0.12 ms in numpy against 0.9 ms as torch ops. Adagrad state starts fresh each
hour (nothing to store per row, and the step is a pure function of the row and the hour's events).

Determinism (needed for exactly-once): each user's new row depends only on that user's
inputs. The loss is a sum of per-user terms and every op is row-wise, so other rows' values do
not enter; the batch SHAPE still selects BLAS kernels, so users are processed in fixed chunks of
the hour's sorted user list (``chunks``), whatever subset of them a restart still has to write.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import numpy as np
import torch

from models.towers import UserTowerArrays
from streaming.windows import HOUR_MS

ONE_WEIGHT = np.ones(1, dtype=np.float32)
ONE_WEIGHT.flags.writeable = False  # shared by every single-event user

NEGATIVES_SEED = 20_240_301
"""Seed of the per-version permutation that the hours' negative samples are windows of."""
WINDOW_TABLE_BYTES = 64 << 20
"""Largest copy of the item vectors in permutation order kept per version (see ``_window_vectors``)."""


@dataclass(frozen=True)
class UserTargets:
    """One user's positives in the hour: item indices (unique) and their normalised weights."""

    items: np.ndarray
    """int64 [P] item_idx >= 1."""
    weights: np.ndarray
    """float32 [P], sum 1."""


def user_targets(item_idx: list[int], weights: list[float]) -> UserTargets | None:
    """Merge repeated items (their weights add up) and normalise; None when nothing is left
    (no known item, or total weight 0). Pure."""
    if len(item_idx) == 1:  # most users have one event in an hour: skip the merge (same result)
        if item_idx[0] <= 0 or not float(weights[0]) > 0:
            return None
        return UserTargets(np.array(item_idx, dtype=np.int64), ONE_WEIGHT)
    merged: dict[int, float] = {}
    for i, w in zip(item_idx, weights):
        if i > 0:
            merged[i] = merged.get(i, 0.0) + float(w)
    total = sum(merged.values())
    if not merged or total <= 0:
        return None
    items = np.array(sorted(merged), dtype=np.int64)
    return UserTargets(items, np.array([merged[i] / total for i in items], dtype=np.float32))


def chunk_size(n_items: int, logit_budget: int, max_chunk: int = 512) -> int:
    """Users per chunk so that a chunk's logits (users x items) stay within ``logit_budget`` floats."""
    return int(max(1, min(max_chunk, logit_budget // max(1, n_items + 1))))


def chunks(n: int, size: int) -> list[range]:
    """Consecutive index ranges of at most ``size`` covering ``range(n)`` (deterministic shapes)."""
    return [range(start, min(start + size, n)) for start in range(0, n, size)]


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Eval mode and no gradients for every parameter (the incremental path never moves them)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class Negatives(NamedTuple):
    """The items an hour's softmax normalises over besides each user's own positives.

    Entries ``start .. start + C - 1`` (mod N) of an ordering of the N items, whose inverse is
    ``position`` (item_idx -> place in the ordering), so a positive's column among the
    negatives is found in O(1). ``log_correction`` is added to their logits: 0 for the full
    corpus, log(N / C) for a sample of C.
    """

    idx: np.ndarray
    """int64 [C] item_idx >= 1."""
    vectors: np.ndarray
    """float32 [C, d]: their item vectors."""
    position: np.ndarray
    """int64 [N + 1]: item i is entry ``position[i]`` of the ordering (entry 0 unused)."""
    start: int
    log_correction: float

    def columns(self, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For item_idx ``items`` (>= 1, any shape): (column among the negatives, whether it is
        one of them). The column is meaningless where it is not."""
        col = self.position[items]
        col -= self.start
        col %= len(self.position) - 1
        return col, col < len(self.idx)


class RowUpdateArrays:
    """What the update reads of a version, as numpy arrays made once per version (lazily, by
    ``LoadedVersion.update_arrays``): the user tower, the corpus vectors, each user's pooled
    attributes and the seeded item permutation the hours' negatives are windows of."""

    def __init__(self, model, item_vectors: torch.Tensor, user_attrs: torch.Tensor):
        self.tower = UserTowerArrays(model)
        self.inv_tau = float(1.0 / float(model.temperature))
        self.item_vectors = np.ascontiguousarray(item_vectors.numpy(), dtype=np.float32).view()
        """float32 [N + 1, d], row 0 padding: a read-only view of the version's tensor (float32, contiguous)."""
        self.item_vectors.flags.writeable = False
        self.user_attr_context = self._attribute_contexts(np.asarray(user_attrs.numpy(), dtype=np.int64))
        """float32 [n_users + 1, e]: each user's pooled attributes, the attribute part of the
        tower's context (as many floats per user as the model's own ID table holds)."""
        self._windows: dict[int, np.ndarray | None] = {}
        self.max_logit = float(np.sqrt(np.max(np.einsum("nd,nd->n", self.item_vectors, self.item_vectors)))) * self.inv_tau
        """Bound on |logit| before the sample's correction: unit user vectors, so |v_i| / tau."""

    def _attribute_contexts(self, user_attrs: np.ndarray, batch: int = 65_536) -> np.ndarray:
        out = np.empty((len(user_attrs), self.tower.attr_table.shape[1]), dtype=np.float32)
        for start in range(0, len(user_attrs), batch):  # bounded temporaries: [batch, A, e]
            out[start : start + batch] = self.tower.attribute_context(user_attrs[start : start + batch])
        out.flags.writeable = False
        return out

    @property
    def n_items(self) -> int:
        return len(self.item_vectors) - 1

    @cached_property
    def _permutation(self) -> tuple[np.ndarray, np.ndarray]:
        """(the seeded permutation of items 1..N written twice, so any window of <= N entries is
        one slice, int64 [2N]; its inverse, int64 [N + 1])."""
        perm = np.random.default_rng(NEGATIVES_SEED).permutation(self.n_items).astype(np.int64) + 1
        position = np.zeros(self.n_items + 1, dtype=np.int64)
        position[perm] = np.arange(self.n_items)
        return np.concatenate([perm, perm]), position

    def _window_vectors(self, n_negatives: int) -> np.ndarray | None:
        """The item vectors in permutation order followed by the first ``n_negatives`` again
        ([N + C, d]: any hour's window is one slice of it, no gather), for corpora where that
        copy stays within ``WINDOW_TABLE_BYTES``; None beyond (each hour gathers its C rows).
        Either way an hour reads the same vectors."""
        cached = self._windows.get(n_negatives)
        if cached is None and n_negatives not in self._windows:
            if (self.n_items + n_negatives) * self.item_vectors.nbytes // len(self.item_vectors) <= WINDOW_TABLE_BYTES:
                twice, _ = self._permutation
                cached = np.take(self.item_vectors, twice[: self.n_items + n_negatives], axis=0)
                cached.flags.writeable = False
            self._windows[n_negatives] = cached
        return cached

    @cached_property
    def _full_corpus(self) -> Negatives:
        n = self.n_items
        return Negatives(np.arange(1, n + 1), self.item_vectors[1:], np.arange(-1, n), 0, 0.0)

    def negatives(self, n_negatives: int, hour: int) -> Negatives:
        """Hour ``hour``'s negatives (hours since the epoch): the ``n_negatives`` entries of the
        permutation from (hour * n_negatives) mod N on, wrapping; the full corpus, in item
        order, when the sample would not be smaller than it."""
        n = self.n_items
        if n_negatives <= 0 or n_negatives >= n:
            return self._full_corpus
        twice, position = self._permutation
        start = (hour * n_negatives) % n
        window = slice(start, start + n_negatives)
        table = self._window_vectors(n_negatives)
        vectors = table[window] if table is not None else np.take(self.item_vectors, twice[window], axis=0)
        return Negatives(twice[window], vectors, position, start, float(np.log(n / n_negatives)))

    def context(self, user_idx: list[int], hists: list[np.ndarray]) -> np.ndarray:
        """The users' tower context (pooled attributes ⊕ pooled history), float32 [B, c]:
        vocabulary index ``user_idx`` (0, or beyond the table: no attributes) and histories
        (item_idx, oldest first; the newest ``history_len`` of the model count)."""
        if len(user_idx) == 1:  # most hours: a view of the table's row, no gather
            i = user_idx[0]
            attrs = self.user_attr_context[i if 0 <= i < len(self.user_attr_context) else 0][None, :]
        else:
            idx = np.asarray(user_idx, dtype=np.int64)
            idx[idx >= len(self.user_attr_context)] = 0
            attrs = self.user_attr_context[idx]
        if not self.tower.use_history:
            return attrs
        return np.concatenate([attrs, self.tower.history_context(hists)], axis=1)


def hour_rows(
    version, rows: np.ndarray, user_idx: list[int], hists: list[np.ndarray], targets: list[UserTargets], hour_ms: int, cfg
) -> np.ndarray:
    """One hour's new rows: float32 [B, e] from the start ``rows[B, e]`` of B users (vocabulary
    index ``user_idx``, 0 = unknown), their histories before the hour (item_idx int arrays,
    oldest first) and targets; ``version`` a streaming.version.LoadedVersion, ``cfg`` the
    IncrementalConfig. The hour's negatives are the hour's window of the version's permutation,
    and the users are processed in fixed chunks of the given order, so a row comes out of the
    same shapes in every attempt at the hour."""
    arrays: RowUpdateArrays = version.update_arrays
    negatives = arrays.negatives(cfg.negatives, hour_ms // HOUR_MS)
    size = chunk_size(len(negatives.idx), cfg.logit_budget)
    # a chunk's positives are padded to its widest user: [chunk, P, d] floats. One heavy user (a
    # bot with thousands of events in an hour) would make that gigabytes at 512 users a chunk,
    # so the hour's widest user bounds the chunk too (a function of the hour's content: every
    # attempt chunks alike)
    widest = max((len(t.items) for t in targets), default=1)
    size = max(1, min(size, cfg.logit_budget // (widest * (arrays.item_vectors.shape[1] + 1) + len(negatives.idx))))
    out = np.empty((len(rows), rows.shape[1]), dtype=np.float32)
    for rng in chunks(len(rows), size):
        sl = slice(rng.start, rng.stop)
        out[sl] = update_rows(arrays, negatives, rows[sl], arrays.context(user_idx[sl], hists[sl]), targets[sl], cfg.steps, cfg.lr)
    return out


def update_rows(
    arrays: RowUpdateArrays, negatives: Negatives, rows: np.ndarray, context: np.ndarray, targets: list[UserTargets], steps: int, lr: float
) -> np.ndarray:
    """Run ``steps`` Adagrad steps on ``rows[B, e]`` and return the new rows, float32 [B, e].

    ``context[B, c]`` is the users' tower context (``RowUpdateArrays.context``), ``targets`` one
    UserTargets per row. The softmax of user b runs over [its P positives | the negatives that
    are not among them]; with the full corpus as negatives that is every item exactly once. The
    batch is processed as given (callers chunk it).

    An hour is ~80 numpy calls of a microsecond or two each, so their count is the cost. The
    softmax gradient stays (p - w) . V and not E_p[v] - w . V (one call fewer): the latter
    cancels when p is close to w and loses digits that Adagrad's first step amplifies.
    """
    if len(targets) != len(rows):
        raise ValueError(f"{len(targets)} target lists for {len(rows)} rows")
    tower, inv_tau = arrays.tower, arrays.inv_tau
    items, item_w = padded_targets(targets)  # [B, P]
    n_pos = items.shape[1]
    pos_v = arrays.item_vectors[items]  # [B, P, d]; padded slots gather row 0 with weight 0
    neg_v = negatives.vectors  # [C, d]
    neg_vt = neg_v.T  # [d, C], a view: BLAS reads it transposed
    bias = logit_bias(negatives, items, item_w)  # [B, P + C]
    # softmax is shift-invariant; the usual max shift only keeps exp in float32's range, which
    # |logit| <= max |v| / tau + correction <= 60 already does (tau 0.05: 20 + log(N / C))
    shift = arrays.max_logit + negatives.log_correction > 60.0
    hidden_context = tower.hidden_context(context)
    row = np.asarray(rows, dtype=np.float32)  # each step makes a new array: the caller's stays untouched
    state_sum = None
    for _ in range(steps):
        fwd = tower.row_forward(row, hidden_context, scale=inv_tau)  # fwd.v = u / tau
        s = bias.work  # logits of [positives | negatives], each part written in place
        np.matmul(fwd.v, neg_vt, out=s[:, n_pos:])
        np.matmul(pos_v, fwd.v[:, :, None], out=s[:, :n_pos, None])
        s += bias.values
        if shift:
            s -= s.max(axis=1, keepdims=True)
        np.exp(s, out=s)
        s /= s.sum(axis=1, keepdims=True)  # the softmax p over [positives | negatives]
        s[:, :n_pos] -= item_w  # dL/ds = p - w on the positives, p on the negatives
        grad_v = np.matmul(s[:, None, :n_pos], pos_v)[:, 0]  # dL/d(u / tau)
        grad_v += np.dot(s[:, n_pos:], neg_v)
        row, state_sum = adagrad_step(row, tower.row_backward(grad_v, fwd), state_sum, lr)
    return row if steps > 0 else row.copy()


def padded_targets(targets: list[UserTargets]) -> tuple[np.ndarray, np.ndarray]:
    """(items int64 [B, P], weights float32 [B, P]) padded with item 0 / weight 0."""
    if len(targets) == 1:
        return targets[0].items[None, :], targets[0].weights[None, :]
    widths = {len(t.items) for t in targets}
    if len(widths) == 1:  # nothing to pad (e.g. one event per user): one concatenation each
        shape = (len(targets), widths.pop())
        return np.concatenate([t.items for t in targets]).reshape(shape), np.concatenate([t.weights for t in targets]).reshape(shape)
    width = max(widths)
    items = np.zeros((len(targets), width), dtype=np.int64)
    weights = np.zeros((len(targets), width), dtype=np.float32)
    for b, t in enumerate(targets):
        items[b, : len(t.items)] = t.items
        weights[b, : len(t.items)] = t.weights
    return items, weights


class LogitBias(NamedTuple):
    """``values``: what is added to the logits [B, P + C] of [positives | negatives]; ``work``:
    an uninitialised array of that shape for the logits themselves (one allocation per hour)."""

    values: np.ndarray
    work: np.ndarray


def logit_bias(negatives: Negatives, items: np.ndarray, item_w: np.ndarray) -> LogitBias:
    """What is added to the logits [B, P + C] of [positives | negatives]: -inf on padded
    positive slots and where a negative is one of the user's own positives (it is counted
    once, as a positive), the sample's log correction on the other negatives."""
    n_pos = items.shape[1]
    bias = np.empty((len(items), n_pos + len(negatives.idx)), dtype=np.float32)
    bias[:, :n_pos] = 0.0
    bias[:, n_pos:] = negatives.log_correction
    col, hit = negatives.columns(items)
    padded = item_w <= 0  # slots of users with fewer positives than the chunk's widest
    if padded.any():
        bias[:, :n_pos][padded] = -np.inf
        hit &= ~padded
    if len(items) == 1:
        bias[0, col[0][hit[0]] + n_pos] = -np.inf
    else:
        b, p = np.nonzero(hit)
        bias[b, col[b, p] + n_pos] = -np.inf
    return LogitBias(bias, np.empty_like(bias))


def adagrad_step(
    param: np.ndarray, grad: np.ndarray, state_sum: np.ndarray | None, lr: float, eps: float = 1e-10
) -> tuple[np.ndarray, np.ndarray]:
    """One Adagrad step on float32 arrays, the update of ``torch.optim.Adagrad`` (no lr decay,
    no weight decay, zero initial accumulator: ``state_sum`` None on the first step) in its
    operation order. Returns new (param, state_sum) arrays; the given ones are not modified."""
    square = grad * grad
    state_sum = square if state_sum is None else state_sum + square
    return param - np.float32(lr) * grad / (np.sqrt(state_sum) + np.float32(eps)), state_sum

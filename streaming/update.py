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
unchanged (tests check it). Adagrad state starts fresh each hour (nothing to store per row, and
the step is a pure function of the row and the hour's events).

Determinism (needed for exactly-once): each user's new row depends only on that user's inputs.
The loss is a sum of per-user terms and every op is row-wise, so other rows' values do not
enter; array SHAPES still select BLAS kernels and summation orders, so every row is computed in
a block of fixed shape, the same in every attempt at its hour (``run_jobs``). That also lets a
batch of hours share its array calls: an update step costs ~40 numpy calls of a microsecond or
more each whatever their size, and a backlog of sparse hours (MovieLens: one or two users an
hour) paid them per hour; now it pays them per pass over the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import numpy as np
import torch

from models.towers import UserTowerArrays
from streaming.windows import HOUR_MS

LARGE_HOUR = 16
"""Row updates from which an hour is cut into blocks of many users instead of one (``block_size``)."""
MAX_BLOCK = 512
"""Most users in one block."""
SMALL_STACK = 1 << 17
"""Padded positive floats ([blocks, users, P, d]) below which a stack takes wider blocks whatever
the padding: there the ~50 array calls of a stack cost more than the padding (``_stacks``)."""
NO_HISTORY = np.zeros(0, dtype=np.int32)

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

    def columns(self, items: np.ndarray, start: int | np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """For item_idx ``items`` (>= 1, any shape): (column among the negatives, whether it is
        one of them). The column is meaningless where it is not. ``start`` (default: this
        window's) may be an array broadcast against ``items``: windows of the same size of other
        hours, one per block (``logit_biases``)."""
        col = self.position[items]
        col -= self.start if start is None else start
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

    def sample_size(self, n_negatives: int) -> int:
        """How many items an hour's negatives hold: ``n_negatives``, or the whole corpus when that
        is 0 or would not be smaller than it."""
        return n_negatives if 0 < n_negatives < self.n_items else self.n_items

    def negatives(self, n_negatives: int, hour: int) -> Negatives:
        """Hour ``hour``'s negatives (hours since the epoch): the ``n_negatives`` entries of the
        permutation from (hour * n_negatives) mod N on, wrapping; the full corpus, in item
        order, when the sample would not be smaller than it."""
        n = self.n_items
        if self.sample_size(n_negatives) == n:
            return self._full_corpus
        twice, position = self._permutation
        start = (hour * n_negatives) % n
        window = slice(start, start + n_negatives)
        table = self._window_vectors(n_negatives)
        vectors = table[window] if table is not None else np.take(self.item_vectors, twice[window], axis=0)
        return Negatives(twice[window], vectors, position, start, float(np.log(n / n_negatives)))

    def context(self, user_idx: list[int] | np.ndarray, hists: list[np.ndarray]) -> np.ndarray:
        """The users' tower context (pooled attributes ⊕ pooled history), float32 [B, c]:
        vocabulary index ``user_idx`` (0, or beyond the table: no attributes) and histories
        (item_idx, oldest first; the newest ``history_len`` of the model count). One gather and
        one history matrix whatever B is, so a user's context does not depend on the others."""
        idx = np.array(user_idx, dtype=np.int64)
        idx[(idx < 0) | (idx >= len(self.user_attr_context))] = 0
        attrs = self.user_attr_context[idx]
        if not self.tower.use_history:
            return attrs
        return np.concatenate([attrs, self.tower.history_context(hists)], axis=1)


@dataclass(slots=True, eq=False)
class RowJob:
    """One user's row update in one hour: the inputs and, once computed, ``out`` (float32 [e]).

    ``start`` is the row before the hour, or the job of the same user's previous hour in the
    same batch, whose ``out`` it is (a batch plans all its hours before computing any)."""

    hour: int
    """The hour, in hours since the epoch (it picks the negatives)."""
    start: "np.ndarray | RowJob"
    user_idx: int
    """Vocabulary index (0: unknown user)."""
    hist: np.ndarray
    """int item_idx of the user's history before the hour, oldest first."""
    targets: UserTargets
    partition: int = 0
    """The Kafka partition of the user's events: an hour's blocks are cut per partition."""
    out: np.ndarray | None = None
    level: int = 0
    """Computed in the level-th pass over the batch (0: its start row is known)."""

    def start_row(self) -> np.ndarray:
        start = self.start
        if isinstance(start, RowJob):
            if start.out is None:
                raise RuntimeError("a row update was computed before the update it starts from")
            return start.out
        return start


def hour_rows(
    version, rows: np.ndarray, user_idx: list[int], hists: list[np.ndarray], targets: list[UserTargets], hour_ms: int, cfg
) -> np.ndarray:
    """One hour's new rows: float32 [B, e] from the start ``rows[B, e]`` of B users (vocabulary
    index ``user_idx``, 0 = unknown), their histories before the hour (item_idx int arrays,
    oldest first) and targets; ``version`` a streaming.version.LoadedVersion, ``cfg`` the
    IncrementalConfig (see ``run_jobs``)."""
    hour = hour_ms // HOUR_MS
    jobs = [RowJob(hour, rows[b], user_idx[b], hists[b], targets[b]) for b in range(len(rows))]
    run_jobs(version, [jobs], cfg)
    return np.stack([job.out for job in jobs]) if jobs else np.empty((0, rows.shape[1]), dtype=np.float32)


def run_jobs(version, hours: list[list[RowJob]], cfg, after_level=None) -> None:
    """Compute every job of ``hours`` (each hour's jobs in the hour's user order), filling
    ``out``; ``after_level(k)`` is called after pass k (the batch sends the writes whose rows
    are known by then).

    Why blocks: a row must come out of the same arithmetic in every attempt at its hour (exactly
    once), yet a batch of hours should cost a few array calls, not a few per hour. So each
    hour's users of each partition are cut into consecutive blocks (``block_size``: a function
    of the hour's content in that partition alone, so a row's bits are the same however a
    consumer group spreads the partitions over its members, before or after a rebalance), and
    every array operation works on a stack of blocks of one size: matmuls over [block, k]
    matrices, reductions over a fixed length, positive slots padded at the end
    where only sequential sums run over them. A row's result is then the same whatever blocks
    and padding share the call (numpy runs a stacked matmul block by block), and the batch can
    compute every block whose start rows are known in one pass: pass 0 holds each user's first
    hour of the batch, pass k the blocks that need a row from pass k - 1. One hour alone is one
    pass. (tests/test_stream_update.py holds rows to that, bit for bit.)
    """
    run_levels(version, assign_levels(hours, version.update_arrays, cfg), cfg, after_level)


Block = list  # list[RowJob]: one block's jobs


def assign_levels(hours: list[list[RowJob]], arrays: "RowUpdateArrays", cfg) -> list[list[Block]]:
    """Cut each hour's jobs into blocks and set every job's ``level``: the blocks of each pass,
    pass 0 first (see ``run_jobs``)."""
    levels: list[list[Block]] = []
    for hour_jobs in hours:
        for jobs in _by_partition(hour_jobs):
            size = block_size(jobs, arrays, cfg)
            for i in range(0, len(jobs), size):
                _add_block(levels, jobs[i : i + size])
    return levels


def _by_partition(jobs: list[RowJob]) -> list[list[RowJob]]:
    """An hour's jobs split by partition, each part in the hour's user order."""
    parts: dict[int, list[RowJob]] = {}
    for job in jobs:
        part = parts.get(job.partition)
        if part is None:
            part = parts[job.partition] = []
        part.append(job)
    return [parts[p] for p in sorted(parts)]


def _add_block(levels: list[list[Block]], block: Block) -> None:
    """Put ``block`` in the first pass after the blocks its start rows come from."""
    level = max(job.start.level + 1 if isinstance(job.start, RowJob) else 0 for job in block)
    for job in block:
        job.level = level
    while len(levels) <= level:
        levels.append([])
    levels[level].append(block)


def run_levels(version, levels: list[list[Block]], cfg, after_level=None) -> None:
    """Compute the passes of ``assign_levels`` in order; ``after_level(k)`` after pass k."""
    arrays: RowUpdateArrays = version.update_arrays
    for k, blocks in enumerate(levels):
        for stack in _stacks(blocks, arrays, cfg):
            _compute_stack(arrays, stack, cfg)
        if after_level is not None:
            after_level(k)


def block_size(jobs: list[RowJob], arrays: "RowUpdateArrays", cfg) -> int:
    """Users per block among these row updates of one hour and partition (a function of their
    content). A small hour (the common sparse case: one or two users) has a block per user,
    which the passes of a batch stack across hours. A large hour is cut into chunks of up to
    MAX_BLOCK users, for BLAS's matrix-matrix products; its widest user bounds them too,
    since a block's positives are padded to it ([block, P, d] floats within the budget: one
    heavy user, a bot with thousands of events in an hour, would otherwise make gigabytes)."""
    if len(jobs) < LARGE_HOUR:
        return 1
    widest = max(len(job.targets.items) for job in jobs)
    n_neg = arrays.sample_size(cfg.negatives)
    d = arrays.item_vectors.shape[1]
    return int(max(1, min(MAX_BLOCK, cfg.logit_budget // (widest * (d + 1) + n_neg))))


def _widest(block: Block) -> int:
    return max(len(job.targets.items) for job in block)


def _stacks(blocks: list[Block], arrays: "RowUpdateArrays", cfg) -> list[list[Block]]:
    """A pass's blocks in stacks of one block size (and one hour for large blocks). Positives are
    padded to the stack's widest block, so blocks go in order of width, and a stack takes the
    next (wider) block while its padded positives stay within twice its real ones, or within
    SMALL_STACK floats whatever the padding (a heavy user does not widen everyone, while a
    stack's fixed cost, some 50 array calls, is paid by as many blocks as can share it); its
    arrays stay within ``cfg.logit_budget`` floats."""
    n_neg = arrays.sample_size(cfg.negatives)
    d = arrays.item_vectors.shape[1]
    stacks: list[list[Block]] = []
    current: list[Block] = []
    current_kind: tuple = ()
    real = 0  # the current stack's positive slots without padding
    for block in sorted(blocks, key=lambda b: (len(b), b[0].hour if len(b) > 1 else 0, _widest(b))):
        width = _widest(block)
        per_block = len(block) * (width * (d + 2) + 2 * n_neg) + n_neg * d
        # a large hour's blocks stack with their own hour's only, so they read its negatives
        # once ([1, C, d]) instead of a copy per block
        kind = (len(block), block[0].hour if len(block) > 1 else None)
        padded = (len(current) + 1) * len(block) * width
        fits = padded <= 2 * (real + len(block) * width) or padded * d <= SMALL_STACK
        if current and (kind != current_kind or not fits or (len(current) + 1) * per_block > cfg.logit_budget):
            stacks.append(current)
            current, real = [], 0
        current.append(block)
        current_kind = kind
        real += len(block) * width
    if current:
        stacks.append(current)
    return stacks


def _compute_stack(arrays: "RowUpdateArrays", blocks: list[Block], cfg) -> None:
    """Pad the blocks' positives to the widest, run the update on the stack (blocks of one size),
    fill ``out``."""
    n, size, width = len(blocks), len(blocks[0]), max(_widest(block) for block in blocks)
    rows = np.zeros((n, size, arrays.tower.w_row.shape[1]), dtype=np.float32)
    items = np.zeros((n, size, width), dtype=np.int64)
    weights = np.zeros((n, size, width), dtype=np.float32)
    user_idx = np.zeros(n * size, dtype=np.int64)
    hists = [NO_HISTORY] * (n * size)
    hours = []
    for b, block in enumerate(blocks):
        for k, job in enumerate(block):
            rows[b, k] = job.start_row()
            m = len(job.targets.items)
            items[b, k, :m] = job.targets.items
            weights[b, k, :m] = job.targets.weights
            user_idx[b * size + k] = job.user_idx
            hists[b * size + k] = job.hist
        hours.append(block[0].hour)
    context = arrays.context(user_idx, hists).reshape(n, size, -1)
    negatives = [arrays.negatives(cfg.negatives, hour) for hour in hours]
    out = update_blocks(arrays, negatives, rows, context, items, weights, cfg.steps, cfg.lr, one_hour=size > 1)
    for b, block in enumerate(blocks):
        for k, job in enumerate(block):
            job.out = out[b, k].copy()  # a copy: a view would pin the whole stack


def update_blocks(
    arrays: "RowUpdateArrays", negatives: list[Negatives], rows: np.ndarray, context: np.ndarray,
    items: np.ndarray, item_w: np.ndarray, steps: int, lr: float, one_hour: bool = False,
) -> np.ndarray:
    """Run ``steps`` Adagrad steps on ``rows[n, block, e]`` and return the new rows (same shape).

    Block b belongs to the hour whose ``negatives[b]`` it normalises over (all one hour when
    ``one_hour``); ``context[n, block, c]``
    is the users' tower context (``RowUpdateArrays.context``), ``items``/``item_w`` [n, block, P]
    their positives, padded with item 0 / weight 0. The softmax of each user runs over [its
    positives | the negatives that are not among them]; with the full corpus as negatives that is
    every item exactly once.

    The positives and the negatives are separate arrays: the negatives' logits are [block, C]
    matmuls of a fixed shape, the positives' are elementwise products summed over d, and every
    sum over the positive slots runs in slot order (cumsum, or a reduction over a non-last
    axis), so padded slots (exp(-inf) = 0, weight 0, at the end) change nothing. The softmax
    gradient stays (p - w) . V and not E_p[v] - w . V: the latter cancels when p is close to w
    and loses digits that Adagrad's first step amplifies.
    """
    tower, inv_tau = arrays.tower, arrays.inv_tau
    first = negatives[0]
    full = first.log_correction == 0.0 and len(first.idx) == arrays.n_items
    # the full corpus is the same for every block, and so are the negatives of a stack of one
    # hour's blocks (``one_hour``, decided by the block size, hence the same in every attempt):
    # one [1, C, d] read by all; otherwise each block's hour has a window of its own
    neg_v = first.vectors[None] if full or one_hour else np.stack([g.vectors for g in negatives])  # [n | 1, C, d]
    neg_vt = neg_v.swapaxes(1, 2)  # a view: BLAS reads it transposed
    pos_v = arrays.item_vectors[items]  # [n, block, P, d]; padded slots gather row 0
    pos_bias, neg_bias = logit_biases(negatives, items, item_w)
    # softmax is shift-invariant; the usual max shift only keeps exp in float32's range, which
    # |logit| <= max |v| / tau + correction <= 60 already does (tau 0.05: 20 + log(N / C))
    shift = arrays.max_logit + first.log_correction > 60.0
    hidden_context = tower.hidden_context(context)
    row = np.asarray(rows, dtype=np.float32)  # each step makes a new array: the caller's stays untouched
    state_sum = None
    for _ in range(steps):
        fwd = tower.row_forward(row, hidden_context, scale=inv_tau)  # fwd.v = u / tau, [n, block, d]
        neg = np.matmul(fwd.v, neg_vt)  # [n, block, C]
        neg += neg_bias
        pos = (pos_v * fwd.v[:, :, None, :]).sum(axis=-1)  # [n, block, P]
        pos += pos_bias
        if shift:
            top = np.maximum(neg.max(axis=-1), pos.max(axis=-1))[..., None]
            neg -= top
            pos -= top
        np.exp(neg, out=neg)
        np.exp(pos, out=pos)
        total = neg.sum(axis=-1, keepdims=True)
        total += np.cumsum(pos, axis=-1)[..., -1:]
        neg /= total  # the softmax p over [positives | negatives]
        pos /= total
        pos -= item_w  # dL/ds = p - w on the positives, p on the negatives
        grad_v = np.matmul(neg, neg_v)  # dL/d(u / tau), [n, block, d]
        grad_v += (pos[..., None] * pos_v).sum(axis=-2)
        row, state_sum = adagrad_step(row, tower.row_backward(grad_v, fwd), state_sum, lr)
    return row if steps > 0 else row.copy()


def logit_biases(negatives: list[Negatives], items: np.ndarray, item_w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What is added to the logits of the positives [n, block, P] and of the negatives
    [n, block, C]: -inf on padded positive slots (weight 0) and where a negative is one of the
    user's own positives (it is counted once, as a positive), the sample's log correction on
    the other negatives."""
    first = negatives[0]
    padded = item_w <= 0
    pos_bias = np.where(padded, np.float32(-np.inf), np.float32(0.0)).astype(np.float32)
    neg_bias = np.full((*items.shape[:2], len(first.idx)), first.log_correction, dtype=np.float32)
    col, hit = first.columns(items, np.array([g.start for g in negatives], dtype=np.int64)[:, None, None])
    hit &= ~padded
    b, k, p = np.nonzero(hit)
    neg_bias[b, k, col[b, k, p]] = -np.inf
    return pos_bias, neg_bias


def adagrad_step(
    param: np.ndarray, grad: np.ndarray, state_sum: np.ndarray | None, lr: float, eps: float = 1e-10
) -> tuple[np.ndarray, np.ndarray]:
    """One Adagrad step on float32 arrays, the update of ``torch.optim.Adagrad`` (no lr decay,
    no weight decay, zero initial accumulator: ``state_sum`` None on the first step) in its
    operation order. Returns new (param, state_sum) arrays; the given ones are not modified."""
    square = grad * grad
    state_sum = square if state_sum is None else state_sum + square
    return param - np.float32(lr) * grad / (np.sqrt(state_sum) + np.float32(eps)), state_sum

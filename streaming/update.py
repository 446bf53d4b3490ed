"""The hourly update rule: a few Adagrad steps on user-ID rows only (DESIGN §5). Pure tensors in, rows out.

Objective. For each touched user u with positives P_u (the known items of u's events in the
hour, weights w_e normalised to sum to 1 per user):

    loss = sum_u  - sum_{e in P_u} w_e * log softmax_i( <f(row_u, attrs_u, hist_u), v_i> / tau )[item_e]

f is the frozen user tower with the Redis row injected in place of the ID lookup
(``TwoTower.user_vectors_from_rows``), v_i the frozen item vectors of the version (the
``item_embeddings.npy`` that the index serves), and the softmax runs over the FULL corpus
(padding row 0 excluded). Why full softmax and not the in-batch sampled softmax of training:
an hour touches few users, so in-batch negatives would be a handful of items chosen by who
happened to be active, and they would change when a crash splits the hour differently; the
full softmax is what the sampled softmax with logQ correction estimates, costs B x N x d per
step (N = 1.7k items here; chunking keeps B x N within ``logit_budget``), and needs no
frequency estimates. A corpus of tens of millions of items would switch to a fixed, seeded
negative sample per hour with the logQ correction; that is not needed at this size.

Only the rows move. The model's parameters have ``requires_grad=False`` and gradients are taken
with respect to the row tensor alone; every other weight stays bitwise unchanged (tests check it). Adagrad state
starts fresh each hour (nothing to store per row, and the step is a pure function of the row
and the hour's events).

Determinism (needed for exactly-once): each user's new row depends only on that user's
inputs. The loss is a sum of per-user terms and every op is row-wise, so other rows' values do
not enter; the batch SHAPE still selects BLAS kernels, so users are processed in fixed chunks of
the hour's sorted user list (``chunks``), whatever subset of them a restart still has to write.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


ONE_WEIGHT = np.ones(1, dtype=np.float32)
ONE_WEIGHT.flags.writeable = False  # shared by every single-event user


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


def padded_targets(targets: list[UserTargets]) -> tuple[torch.Tensor, torch.Tensor]:
    """(items [B, P] long, weights [B, P] float) padded with item 0 / weight 0."""
    width = max(len(t.items) for t in targets)
    items = np.zeros((len(targets), width), dtype=np.int64)
    weights = np.zeros((len(targets), width), dtype=np.float32)
    for b, t in enumerate(targets):
        items[b, : len(t.items)] = t.items
        weights[b, : len(t.items)] = t.weights
    return torch.from_numpy(items), torch.from_numpy(weights)


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Eval mode and no gradients for every parameter (the incremental path never moves them)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@dataclass(frozen=True)
class Candidates:
    """The items a chunk's softmax normalises over, besides each user's own positives.

    ``idx`` int64 [C] item_idx >= 1; ``log_correction`` is added to their logits: 0 for the
    full corpus, log(N / C) for a uniform sample of C of the N items (the sampled-softmax
    estimate of the full partition function; uniform sampling makes the logQ term a constant).
    """

    idx: torch.Tensor
    log_correction: float


def full_corpus(n_items: int) -> Candidates:
    return Candidates(torch.arange(1, n_items + 1), 0.0)


def sampled_candidates(n_items: int, n_negatives: int, seed: int) -> Candidates:
    """``n_negatives`` items drawn uniformly without replacement, seeded (the same set in every
    attempt at the same hour); the full corpus when it is not larger than the sample."""
    if n_negatives <= 0 or n_negatives >= n_items:
        return full_corpus(n_items)
    gen = torch.Generator().manual_seed(int(seed) % (2**63 - 1))
    idx = torch.randperm(n_items, generator=gen)[:n_negatives].sort().values + 1
    return Candidates(idx, float(np.log(n_items / n_negatives)))


def update_rows(
    model,
    item_vectors: torch.Tensor,
    rows: np.ndarray,
    user_attrs: torch.Tensor,
    hist: torch.Tensor,
    targets: list[UserTargets],
    steps: int,
    lr: float,
    candidates: Candidates | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Run ``steps`` Adagrad steps on ``rows`` and return (new rows float32 [B, e], loss before [B]).

    ``model`` is a frozen TwoTower; ``item_vectors[N + 1, d]`` its corpus vectors (row 0 padding);
    ``rows[B, e]`` the users' current ID rows; ``user_attrs[B, A]`` and ``hist[B, L]`` 0-padded;
    ``targets`` one UserTargets per row; ``candidates`` the softmax's other items (default: the
    whole corpus). The batch is processed as given (callers chunk it).

    The softmax of user b runs over [its P positives | the candidates that are not among them].
    With the full corpus as candidates that is every item exactly once, i.e. the plain full
    softmax. Its gradient with respect to the user vector is closed-form,
    (p - w) . V / tau, and the small user-tower MLP's backward is written out
    (``TwoTower.user_row_map_with_grad``: no autograd graph); the context (pooled attributes and
    history, and its share of the first layer) does not depend on the row and is computed once.
    """
    if len(targets) != len(rows):
        raise ValueError(f"{len(targets)} target lists for {len(rows)} rows")
    cand = candidates if candidates is not None else full_corpus(item_vectors.shape[0] - 1)
    item_idx, item_w = padded_targets(targets)  # [B, P]
    inv_tau = 1.0 / float(model.temperature)
    with torch.no_grad():
        user_vectors = model.user_row_map_with_grad(model.user_context(user_attrs, hist))
        pos_v = item_vectors[item_idx]  # [B, P, d]; padded slots gather row 0 (zeros) with weight 0
        neg_v = item_vectors[cand.idx]  # [C, d]
        pad = item_w <= 0  # padded positive slots
        dup = _positives_among(cand.idx, item_idx, pad)  # flat [B * C] positions: never a negative of their own user
        row_t = torch.tensor(np.asarray(rows, dtype=np.float32))
        state_sum = torch.zeros_like(row_t)
        first_loss = None
        for _ in range(steps):
            u, vjp = user_vectors(row_t)
            su = u * inv_tau
            s_pos = torch.bmm(pos_v, su.unsqueeze(-1)).squeeze(-1).masked_fill_(pad, -torch.inf)  # [B, P]
            s_neg = torch.mm(su, neg_v.T)  # [B, C]
            if cand.log_correction:
                s_neg.add_(cand.log_correction)
            s_neg.view(-1)[dup] = -torch.inf
            # softmax over [positives | negatives] without concatenating: one exp per logit
            m = torch.maximum(s_pos.amax(1, keepdim=True), s_neg.amax(1, keepdim=True))
            e_pos, e_neg = s_pos.sub_(m).exp_(), s_neg.sub_(m).exp_()
            z = e_pos.sum(1, keepdim=True).add_(e_neg.sum(1, keepdim=True))
            p_pos, p_neg = e_pos.div_(z), e_neg.div_(z)
            if first_loss is None:
                first_loss = -(item_w * torch.log(p_pos.clamp_min(1e-30))).sum(1).numpy().copy()
            g_pos = p_pos.sub_(item_w)  # dL/ds = p - w on the positives, p on the negatives
            grad_u = torch.bmm(g_pos.unsqueeze(1), pos_v).squeeze(1).addmm_(p_neg, neg_v).mul_(inv_tau)
            adagrad_step(row_t, vjp(grad_u), state_sum, lr)
    if first_loss is None:
        first_loss = np.zeros(len(rows), dtype=np.float32)
    return row_t.numpy().astype(np.float32, copy=True), first_loss


def hour_rows(
    version, rows: np.ndarray, user_idx: list[int], hists: list[np.ndarray], targets: list[UserTargets], hour_ms: int, cfg
) -> np.ndarray:
    """One hour's new rows: float32 [B, e] from the start ``rows[B, e]`` of B users (vocabulary
    index ``user_idx``, 0 = unknown), their histories before the hour (item_idx int arrays,
    oldest first) and targets; ``version`` a streaming.version.LoadedVersion, ``cfg`` the
    IncrementalConfig. The hour's negative sample is seeded by ``hour_ms``, and the users are
    processed in fixed chunks of the given order, so a row comes out of the same shapes in every
    attempt at the hour."""
    n_items = version.item_vectors.shape[0] - 1
    candidates = sampled_candidates(n_items, cfg.negatives, seed=hour_ms // 3_600_000)
    size = chunk_size(len(candidates.idx), cfg.logit_budget)
    out = np.empty((len(rows), rows.shape[1]), dtype=np.float32)
    for rng in chunks(len(rows), size):
        sl = slice(rng.start, rng.stop)
        attrs = version.attrs_of(user_idx[sl])
        hist = history_matrix(hists[sl], version.history_len)
        out[sl], _ = update_rows(version.model, version.item_vectors, rows[sl], attrs, hist, targets[sl], cfg.steps, cfg.lr, candidates)
    return out


def history_matrix(hists: list[np.ndarray], width: int) -> torch.Tensor:
    """Histories (item_idx, oldest first) -> ``LongTensor [N, width]``: the newest ``width`` of
    each, left-aligned, 0-padded (the layout of models.features.history_tensor)."""
    out = np.zeros((len(hists), width), dtype=np.int64)
    for b, h in enumerate(hists):
        n = min(len(h), width)
        if n:
            out[b, :n] = h[len(h) - n :]
    return torch.from_numpy(out)


def _positives_among(cand_idx: torch.Tensor, item_idx: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """Flat positions ``b * C + c`` where candidate c is one of user b's positives (``cand_idx``
    sorted ascending, [C]; ``item_idx`` [B, P] with padded slots marked in ``pad``)."""
    n_cand = len(cand_idx)
    col = torch.searchsorted(cand_idx, item_idx).clamp_max(n_cand - 1)
    hit = (cand_idx[col] == item_idx) & ~pad
    rows = torch.arange(len(item_idx)).unsqueeze(1).expand_as(col)
    return (rows * n_cand + col)[hit]


@torch.no_grad()
def adagrad_step(param: torch.Tensor, grad: torch.Tensor, state_sum: torch.Tensor, lr: float, eps: float = 1e-10) -> None:
    """One Adagrad step in place, the exact update of ``torch.optim.Adagrad`` (no lr decay, no
    weight decay, zero initial accumulator). Written out because the optimiser class pulls in
    torch's compiler stack on first use (1.5 s per process start), and the rule is three lines."""
    state_sum.addcmul_(grad, grad, value=1.0)
    param.addcdiv_(grad, state_sum.sqrt().add_(eps), value=-lr)

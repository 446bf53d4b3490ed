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


def update_rows(
    model,
    item_vectors: torch.Tensor,
    rows: np.ndarray,
    user_attrs: torch.Tensor,
    hist: torch.Tensor,
    targets: list[UserTargets],
    steps: int,
    lr: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Run ``steps`` Adagrad steps on ``rows`` and return (new rows float32 [B, e], loss before [B]).

    ``model`` is a frozen TwoTower; ``item_vectors[N + 1, d]`` its corpus vectors (row 0 padding);
    ``rows[B, e]`` the users' current ID rows; ``user_attrs[B, A]`` and ``hist[B, L]`` 0-padded;
    ``targets`` one UserTargets per row. The batch is processed as given (callers chunk it).
    """
    if len(targets) != len(rows):
        raise ValueError(f"{len(targets)} target lists for {len(rows)} rows")
    item_idx, item_w = padded_targets(targets)
    mask = torch.zeros(item_vectors.shape[0])
    mask[0] = -1e30  # the padding row is never a candidate (finite: padded targets gather it with weight 0)
    row_t = torch.tensor(np.asarray(rows, dtype=np.float32), requires_grad=True)
    state_sum = torch.zeros_like(row_t)
    inv_tau = 1.0 / float(model.temperature)
    first_loss = None
    for _ in range(steps):
        u = model.user_vectors_from_rows(row_t, user_attrs, hist)
        logp = torch.log_softmax(u @ item_vectors.T * inv_tau + mask, dim=-1)
        per_user = -(item_w * logp.gather(1, item_idx)).sum(1)
        if first_loss is None:
            first_loss = per_user.detach().numpy().copy()
        (grad,) = torch.autograd.grad(per_user.sum(), row_t)
        adagrad_step(row_t, grad, state_sum, lr)
    if first_loss is None:
        first_loss = np.zeros(len(rows), dtype=np.float32)
    return row_t.detach().numpy().astype(np.float32, copy=True), first_loss


@torch.no_grad()
def adagrad_step(param: torch.Tensor, grad: torch.Tensor, state_sum: torch.Tensor, lr: float, eps: float = 1e-10) -> None:
    """One Adagrad step in place, the exact update of ``torch.optim.Adagrad`` (no lr decay, no
    weight decay, zero initial accumulator). Written out because the optimiser class pulls in
    torch's compiler stack on first use (1.5 s per process start), and the rule is three lines."""
    state_sum.addcmul_(grad, grad, value=1.0)
    param.addcdiv_(grad, state_sum.sqrt().add_(eps), value=-lr)

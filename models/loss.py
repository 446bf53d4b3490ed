"""In-batch sampled softmax with the logQ correction (Yi et al., RecSys 2019), and the paper's
streaming estimator of item sampling probabilities. Both pure: no I/O, no global state.

Why the correction: in-batch negatives are the other positives of the batch, so an item is a
negative in proportion to its popularity p_i. Without correction the model learns to push
popular items down. Subtracting log p_i from every logit makes the sampled softmax an unbiased
estimate of the full softmax (s_c(u, i) = s(u, i) - log p_i).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def in_batch_softmax_loss(
    logits: torch.Tensor,
    item_idx: torch.Tensor,
    log_q: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean sampled-softmax loss of a batch; row b's positive is column b.

    logits   [B, C] float, C >= B: <u_b, v_c> / temperature. Columns 0..B-1 are the batch's
             own target items (in-batch negatives for the other rows); columns B.. are extra
             sampled negatives, if any.
    item_idx [C] long: the item of each column. A column holding the same item as row b's
             positive (an in-batch duplicate) is not a negative for row b and is masked out.
    log_q    [C] float or None: log sampling probability of each column's item; subtracted
             from every logit of that column (the correction), positives included.
    weights  [B] float or None: example weights; the loss is their weighted mean.
    """
    n_rows = logits.shape[0]
    if log_q is not None:
        logits = logits - log_q.unsqueeze(0)
    positives = torch.arange(n_rows, device=logits.device)
    duplicate = item_idx[:n_rows].unsqueeze(1) == item_idx.unsqueeze(0)
    duplicate[positives, positives] = False
    logits = logits.masked_fill(duplicate, float("-inf"))
    per_example = F.cross_entropy(logits, positives, reduction="none")
    if weights is None:
        return per_example.mean()
    return (per_example * weights).sum() / weights.sum().clamp_min(1e-12)


class StreamingFrequencyEstimator:
    """Yi et al.'s streaming estimate of how often each item is sampled, for training on a
    stream where item counts are not known in advance.

    Two arrays of size H indexed by a hash h(i): A[h] = the step the bucket was last seen,
    B[h] = a moving average of the number of steps between sightings. On a batch at step t:
        B[h(i)] <- (1 - alpha) * B[h(i)] + alpha * (t - A[h(i)]);   A[h(i)] <- t
    and p̂(i) = 1 / B[h(i)] (the chance the item shows up in one batch). A bucket's first
    sighting takes B = t - 0 as its starting gap. An item seen several times in one batch is
    counted once for that step. Items sharing a bucket share an estimate (H >> corpus avoids it).
    """

    _PRIME = np.uint64(2_654_435_761)  # Knuth's multiplicative hash constant

    def __init__(self, size: int = 1 << 20, alpha: float = 0.01):
        if size < 1 or not 0.0 < alpha <= 1.0:
            raise ValueError(f"need size >= 1 and 0 < alpha <= 1, got size={size}, alpha={alpha}")
        self.size, self.alpha = size, alpha
        self.last_step = np.zeros(size, dtype=np.int64)  # A
        self.interval = np.zeros(size, dtype=np.float64)  # B
        self.seen = np.zeros(size, dtype=bool)

    def bucket(self, items: np.ndarray) -> np.ndarray:
        """h(i) for int item ids."""
        return ((np.asarray(items, dtype=np.uint64) * self._PRIME) % np.uint64(self.size)).astype(np.int64)

    def update(self, items: np.ndarray, step: int) -> None:
        """Record the items of the batch at global step ``step`` (steps increase from 1)."""
        h = np.unique(self.bucket(items))
        gap = step - self.last_step[h]
        first = ~self.seen[h]
        self.interval[h] = np.where(first, gap, (1.0 - self.alpha) * self.interval[h] + self.alpha * gap)
        self.last_step[h] = step
        self.seen[h] = True

    def probability(self, items: np.ndarray) -> np.ndarray:
        """p̂ per item (float64); an item never seen gets the smallest estimate so far (or 1)."""
        h = self.bucket(items)
        floor = 1.0 / self.interval[self.seen].max() if self.seen.any() else 1.0
        with np.errstate(divide="ignore"):
            p = np.where(self.seen[h], 1.0 / np.maximum(self.interval[h], 1e-12), floor)
        return p

"""The training loop: examples in memory -> a trained TwoTower. No file I/O (jobs.train does that).

User-ID rows of vocabulary users without a training example (ids kept from an earlier
partition's vocabulary with no event in this window, ids known only from the attribute
catalog) never get a gradient, so after training they would still hold their random init and
be served as if learned. ``fit`` overwrites them with row 0, the out-of-vocabulary row that
user-ID dropout trains to stand for "a user we know nothing about" (models.towers).

Determinism: the same seed, data, config and torch thread count give bitwise-identical
weights. Parameter init, dropout and user-ID dropout draw from torch's RNG, seeded here inside
``torch.random.fork_rng`` so the caller's RNG state is left untouched; batch order comes from
a numpy Generator with the same seed. The thread count is set explicitly for the run (and
restored afterwards) because a different number of threads may sum floats in a different
order; it is recorded in the artifact manifest.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from models.data import Examples, shuffled_batches
from models.features import FeatureTables
from models.loss import StreamingFrequencyEstimator, in_batch_softmax_loss
from models.towers import TwoTower
from twotower.config import ModelConfig, TrainConfig

log = logging.getLogger(__name__)


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite; nothing of the run may be written."""


@dataclass
class TrainResult:
    """A trained model (eval mode) and how the training went."""

    model: TwoTower
    seconds: float
    samples_per_s: float
    threads: int
    epoch_loss: list[float] = field(default_factory=list)
    users_without_examples: int = 0
    """Vocabulary users with no training example, whose ID row was set to row 0 (OOV)."""


def resolve_threads(requested: int) -> int:
    """Threads to train with: the configured count, or every core the process may use (0)."""
    if requested > 0:
        return requested
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not Linux
        return max(os.cpu_count() or 1, 1)


def users_without_examples(user_idx: np.ndarray, n_users: int) -> np.ndarray:
    """Vocabulary indices in ``1..n_users`` that occur nowhere in ``user_idx`` (the train
    split's int array ``[N]``), ascending, ``int64 [k]``. Pure.

    These are exactly the user-ID rows training never reads: a batch looks up the rows of its
    examples' users (or row 0 when user-ID dropout hides one), nothing else.
    """
    if len(user_idx) and (user_idx.min() < 0 or user_idx.max() > n_users):
        raise ValueError(f"user_idx outside the vocabulary 0..{n_users}")
    counts = np.bincount(np.asarray(user_idx, dtype=np.int64), minlength=n_users + 1)
    return np.flatnonzero(counts[1:] == 0).astype(np.int64) + 1


@torch.no_grad()
def copy_oov_row(model: TwoTower, rows: np.ndarray) -> None:
    """Set the user-ID embedding rows ``rows`` (int64 [k], each >= 1) to row 0, in place."""
    table = model.user_id_embedding.weight
    table[torch.from_numpy(rows)] = table[0].clone()  # a view of the table may not be written into it


def learning_rate(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """Learning rate at optimiser step ``step`` (0-based) of ``total_steps``. Pure.

    ``constant``: cfg.lr throughout. ``cosine``: linear warm-up over the first
    cfg.warmup_frac of the steps, then cosine decay to 0.
    """
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if cfg.lr_schedule != "cosine":
        raise ValueError(f"unknown lr_schedule {cfg.lr_schedule!r}; expected 'constant' or 'cosine'")
    warmup = int(cfg.warmup_frac * total_steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(total_steps - warmup, 1)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def fit(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    examples: Examples,
    features: FeatureTables,
    item_log_prob: np.ndarray | None,
    sizes: dict[str, int],
) -> TrainResult:
    """Train a TwoTower from scratch.

    examples       the train split (Examples)
    features       attribute tables indexed by user_idx / item_idx
    item_log_prob  float32 [n_items + 1], log p of each item as a target (logQ with
                   ``logq_source="counts"``); unused otherwise
    sizes          n_users, n_items, n_attrs, history_len (the vocabulary sizes)
    After training, the rows of users without an example are copied from row 0 (module
    docstring); ``TrainResult.users_without_examples`` counts them.
    Raises TrainingDiverged on a NaN/inf loss and ValueError on an empty split.
    """
    if len(examples) == 0:
        raise ValueError("no training examples: the prepared train split is empty")
    threads = resolve_threads(train_cfg.threads)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(train_cfg.seed)
            return _fit(model_cfg, train_cfg, examples, features, item_log_prob, sizes, threads)
    finally:
        torch.set_num_threads(previous_threads)


def _fit(model_cfg, train_cfg, examples, features, item_log_prob, sizes, threads) -> TrainResult:
    model = TwoTower(model_cfg, sizes["n_users"], sizes["n_items"], sizes["n_attrs"], sizes["history_len"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    rng = np.random.default_rng(train_cfg.seed)
    log_q_table = torch.from_numpy(item_log_prob) if item_log_prob is not None else None
    estimator = StreamingFrequencyEstimator() if train_cfg.logq and train_cfg.logq_source == "streaming" else None
    if train_cfg.logq and train_cfg.logq_source not in ("counts", "streaming"):
        raise ValueError(f"unknown logq_source {train_cfg.logq_source!r}; expected 'counts' or 'streaming'")
    if train_cfg.logq and estimator is None and log_q_table is None:
        raise ValueError("logq with logq_source='counts' needs the item log-probabilities")

    n = len(examples)
    steps_per_epoch = math.ceil(n / train_cfg.batch_size)
    total_steps = steps_per_epoch * train_cfg.epochs
    user_idx_all = torch.from_numpy(examples.user_idx)
    item_idx_all = torch.from_numpy(examples.item_idx)
    weight_all = torch.from_numpy(examples.weight)
    hist_all = torch.from_numpy(examples.hist)
    uniform_weights = bool((examples.weight == 1.0).all())

    log.info(
        "training %s (dim %d, hidden %d, tau %.3g) on %s examples: %d epochs x %d steps of %d, %d torch thread(s)",
        model_cfg.arch, model_cfg.dim, model_cfg.hidden, model_cfg.temperature, f"{n:,}",
        train_cfg.epochs, steps_per_epoch, train_cfg.batch_size, threads,
    )  # fmt: skip
    model.train()
    step = 0
    epoch_loss: list[float] = []
    started = time.perf_counter()
    for epoch in range(train_cfg.epochs):
        t0 = time.perf_counter()
        total, count = 0.0, 0
        for batch in shuffled_batches(n, train_cfg.batch_size, rng):
            b = torch.from_numpy(batch)
            users, items, hist = user_idx_all[b], item_idx_all[b], hist_all[b]
            if train_cfg.user_id_dropout > 0:
                # teaches row 0 (out-of-vocabulary) to stand for a user we have no ID row for
                drop = torch.rand(len(users)) < train_cfg.user_id_dropout
                user_ids = torch.where(drop, torch.zeros_like(users), users)
            else:
                user_ids = users
            candidates = items
            if train_cfg.extra_negatives > 0:
                extra = rng.integers(1, sizes["n_items"] + 1, size=train_cfg.extra_negatives)
                candidates = torch.cat([items, torch.from_numpy(extra)])
            log_q = None
            if train_cfg.logq:
                if estimator is not None:
                    estimator.update(items.numpy(), step + 1)
                    rate = torch.from_numpy(estimator.probability(candidates.numpy()).astype(np.float32))
                else:
                    rate = len(items) * torch.exp(log_q_table[candidates])
                # expected draws of each candidate per step: targets by popularity + uniform extras
                log_q = train_cfg.logq_weight * torch.log(rate + train_cfg.extra_negatives / sizes["n_items"])

            for group in optimizer.param_groups:
                group["lr"] = learning_rate(train_cfg, step, total_steps)
            user_vecs = model.user_vectors(user_ids, features.users(users), hist)
            item_vecs = model.item_vectors(candidates, features.items(candidates))
            weights = None if uniform_weights else weight_all[b]
            loss = in_batch_softmax_loss(model.score(user_vecs, item_vecs), candidates, log_q, weights)
            if not torch.isfinite(loss):
                raise TrainingDiverged(
                    f"training diverged: loss is {loss.item()} at epoch {epoch + 1}, step {step + 1}; "
                    f"nothing was written (try a lower lr than {train_cfg.lr} "
                    f"or a higher temperature than {model_cfg.temperature})"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
            count += len(batch)
            step += 1
        seconds = time.perf_counter() - t0
        epoch_loss.append(total / count)
        log.info(
            "epoch %d/%d: loss %.4f, %s samples/s, %.1f s",
            epoch + 1, train_cfg.epochs, epoch_loss[-1], f"{count / seconds:,.0f}", seconds,
        )  # fmt: skip
    seconds = time.perf_counter() - started
    model.eval()
    untrained = users_without_examples(examples.user_idx, sizes["n_users"])
    copy_oov_row(model, untrained)
    log.info(
        "%s of %s vocabulary users have no training example: their ID rows were set to the OOV row 0%s",
        f"{len(untrained):,}", f"{sizes['n_users']:,}",
        "" if train_cfg.user_id_dropout > 0 else " (untrained too: user_id_dropout is 0)",
    )  # fmt: skip
    return TrainResult(model, seconds, n * train_cfg.epochs / seconds, threads, epoch_loss, len(untrained))

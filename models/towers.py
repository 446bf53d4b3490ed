"""The two-tower retrieval model (DESIGN §4), top to bottom.

    user tower:  user-ID embedding ⊕ pooled user-attribute embeddings
                 ⊕ pooled history of the (shared) item-ID embeddings      -> MLP -> L2 norm
    item tower:  item-ID embedding ⊕ pooled item-attribute embeddings    -> MLP -> L2 norm
    score(u, i) = <u, v_i> / temperature

``arch="youtubednn"`` uses the history; ``arch="dssm"`` drops it (ID + profile only).

Index conventions (twotower.contracts): every id table has row 0 reserved. For items and
attributes row 0 is padding (always zero, never trained). For users row 0 is the
out-of-vocabulary / cold-start row: training replaces a small fraction of user ids by 0
(``TrainConfig.user_id_dropout``), so row 0 learns "a user we know nothing about" and the
incremental path can start a new user from it.

Shapes: B users or items in a batch, A attribute slots, L history slots, d = ``cfg.dim``,
e = ``cfg.id_dim``. Attribute and history inputs are 0-padded LongTensors; where the padding
sits does not matter (pooling masks it and counts recency from the last real item).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from twotower.config import ModelConfig
from twotower.contracts import ARTIFACT_FILES

ARCHS = ("youtubednn", "dssm")
POOLINGS = ("mean", "decay", "mean+decay")


def pooled_embeddings(table: nn.Embedding, ids: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Pool ``table`` rows of ``ids[B, S]`` into ``[B, e]``, skipping id 0 (padding).

    Without weights: the mean over the real ids. With ``weights[B, S]`` (0 on padding): the
    weighted mean. Rows with no real id give 0. One fused embedding_bag call, forward and
    backward, instead of gathering a [B, S, e] tensor.
    """
    if weights is None:
        # a padding id is skipped by the mean; an all-padding row comes out as zeros
        return F.embedding_bag(ids, table.weight, mode="mean", padding_idx=0)
    norm = weights / weights.sum(1, keepdim=True).clamp_min(1e-6)
    return F.embedding_bag(ids, table.weight, mode="sum", per_sample_weights=norm.to(table.weight.dtype))


def recency_weights(hist: torch.Tensor, half_life: float) -> torch.Tensor:
    """Weights ``[B, L]`` halving every ``half_life`` items back from the most recent real item.

    The most recent real item (the last non-zero slot, histories being oldest first) gets 1,
    the one before it 0.5 ** (1 / half_life), and so on; padding slots get 0.
    """
    mask = (hist > 0).to(torch.float32)
    # rank 0 = most recent real item: count the real items at or after each slot, minus one
    rank = mask.flip(1).cumsum(1).flip(1) - 1.0
    return mask * torch.pow(0.5, rank.clamp_min(0.0) / half_life)


def pool_history(table: nn.Embedding, hist: torch.Tensor, pooling: str, half_life: float) -> torch.Tensor:
    """Pool the item-ID embeddings of a history ``hist[B, L]``: ``mean`` (long-term taste) or
    ``decay`` (recent intent) give ``[B, e]``; ``mean+decay`` concatenates both, ``[B, 2e]``."""
    parts = []
    if pooling in ("mean", "mean+decay"):
        parts.append(pooled_embeddings(table, hist))
    if pooling in ("decay", "mean+decay"):
        parts.append(pooled_embeddings(table, hist, recency_weights(hist, half_life)))
    return torch.cat(parts, dim=-1)


def mlp(n_in: int, hidden: int, n_out: int, dropout: float) -> nn.Sequential:
    """Two-layer tower head: Linear -> ReLU -> Dropout -> Linear."""
    return nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, n_out))


class TwoTower(nn.Module):
    """User and item towers sharing the item-ID table (items are embedded the same way as
    targets and as history). Build with the vocabulary sizes of the prepared partition."""

    def __init__(self, cfg: ModelConfig, n_users: int, n_items: int, n_attrs: int, history_len: int):
        super().__init__()
        if cfg.arch not in ARCHS:
            raise ValueError(f"unknown model arch {cfg.arch!r}; expected one of {ARCHS}")
        if cfg.pooling not in POOLINGS:
            raise ValueError(f"unknown history pooling {cfg.pooling!r}; expected one of {POOLINGS}")
        self.cfg = cfg
        self.n_users, self.n_items, self.n_attrs, self.history_len = n_users, n_items, n_attrs, history_len
        self.temperature = float(cfg.temperature)
        self.use_history = cfg.arch == "youtubednn"
        e = cfg.id_dim

        self.user_id_embedding = nn.Embedding(n_users + 1, e)  # row 0: out-of-vocabulary / cold start
        self.item_id_embedding = nn.Embedding(n_items + 1, e, padding_idx=0)
        self.attr_embedding = nn.Embedding(n_attrs + 1, e, padding_idx=0)  # user and item tokens: one vocabulary
        for table in (self.user_id_embedding, self.item_id_embedding, self.attr_embedding):
            nn.init.normal_(table.weight, std=cfg.init_std)
            if table.padding_idx is not None:
                with torch.no_grad():
                    table.weight[table.padding_idx].zero_()

        history_width = (2 if cfg.pooling == "mean+decay" else 1) if self.use_history else 0
        self.user_mlp = mlp(e * (2 + history_width), cfg.hidden, cfg.dim, cfg.dropout)
        self.item_mlp = mlp(e * 2, cfg.hidden, cfg.dim, cfg.dropout)

    # --- user tower -----------------------------------------------------------------------

    def user_vectors_from_rows(self, id_rows: torch.Tensor, user_attrs: torch.Tensor, hist: torch.Tensor) -> torch.Tensor:
        """User vectors ``[B, d]`` (unit norm) from given user-ID rows ``id_rows[B, e]``.

        The incremental updater and the serving layer pass the row they read from Redis here;
        gradients flow into ``id_rows``. ``user_attrs[B, A]`` and ``hist[B, L]`` are 0-padded.
        """
        return self.user_vectors_from_context(id_rows, self.user_context(user_attrs, hist))

    def user_context(self, user_attrs: torch.Tensor, hist: torch.Tensor) -> torch.Tensor:
        """Everything of the user tower's input except the ID row: pooled attributes ⊕ pooled
        history, ``[B, e * (1 + history width)]``. (``UserTowerArrays.context`` is its numpy mirror.)"""
        parts = [pooled_embeddings(self.attr_embedding, user_attrs)]
        if self.use_history:
            parts.append(pool_history(self.item_id_embedding, hist, self.cfg.pooling, self.cfg.decay_half_life))
        return torch.cat(parts, dim=-1)

    def user_vectors_from_context(self, id_rows: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """User vectors ``[B, d]`` (unit norm) from ID rows ``[B, e]`` and ``user_context`` ``[B, c]``."""
        return F.normalize(self.user_mlp(torch.cat([id_rows, context], dim=-1)), dim=-1)

    def user_vectors(self, user_idx: torch.Tensor, user_attrs: torch.Tensor, hist: torch.Tensor) -> torch.Tensor:
        """User vectors ``[B, d]`` (unit norm) for vocabulary indices ``user_idx[B]`` (0 = unknown user)."""
        return self.user_vectors_from_rows(self.user_id_embedding(user_idx), user_attrs, hist)

    # --- item tower -----------------------------------------------------------------------

    def item_vectors(self, item_idx: torch.Tensor, item_attrs: torch.Tensor) -> torch.Tensor:
        """Item vectors ``[N, d]`` (unit norm) for ``item_idx[N]`` with attributes ``item_attrs[N, A]``."""
        parts = [self.item_id_embedding(item_idx), pooled_embeddings(self.attr_embedding, item_attrs)]
        return F.normalize(self.item_mlp(torch.cat(parts, dim=-1)), dim=-1)

    # --- score ----------------------------------------------------------------------------

    def score(self, user_vecs: torch.Tensor, item_vecs: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, N]`` = <u, v> / temperature."""
        return user_vecs @ item_vecs.T / self.temperature


class RowPass(NamedTuple):
    """What ``UserTowerArrays.row_forward`` keeps for ``row_backward`` (float32)."""

    v: np.ndarray
    """[..., d] the output: ``scale`` x the unit user vectors."""
    h: np.ndarray
    """[..., hidden] first-layer pre-activations."""
    coef: np.ndarray
    """[..., 1] scale / |z|, z the output before normalisation."""
    inv_scale2: np.float32
    """1 / scale^2."""


class UserTowerArrays:
    """The frozen user tower of a TwoTower (eval mode) as read-only numpy float32 copies, with
    the backward with respect to the ID row written out: the hourly update runs a few steps on
    one or a few rows per hour, where torch's per-op dispatch cost more than the arithmetic.
    Mirrors ``TwoTower.user_context`` and ``user_vectors_from_context`` up to float summation
    order (tests compare them).

    The first layer's weight is split into the row's columns and the context's: the context
    (pooled attributes and history) does not move between steps, so its share of the first
    layer, ``hidden_context``, is computed once per hour. Then for rows r [B, e]:

        h = r W1_row^T + hidden_context,  z = relu(h) W2^T + b2,  u = z / |z|
        dz = (g - u (u . g)) / |z|,  dh = (dz W2) * [h > 0],  dr = dh W1_row
    """

    def __init__(self, model: TwoTower):
        first, _act, _dropout, last = model.user_mlp
        e = int(model.user_id_embedding.weight.shape[1])
        self.use_history = model.use_history
        self.pooling = model.cfg.pooling
        self.half_life = float(model.cfg.decay_half_life)
        self.attr_table = _padded_table(model.attr_embedding)
        self.item_table = _padded_table(model.item_id_embedding) if model.use_history else None
        self.history_len = int(model.history_len)
        self.decay_by_rank, self.decay_total = self._decay_tables(self.history_len)
        self.w_row = _frozen(first.weight[:, :e])  # [hidden, e]
        self.w_row_t = _frozen(first.weight[:, :e].T)  # [e, hidden]
        self.w_context_t = _frozen(first.weight[:, e:].T)  # [c, hidden]
        self.b1 = _frozen(first.bias)
        self.w2 = _frozen(last.weight)  # [d, hidden]
        self.w2_t = _frozen(last.weight.T)  # [hidden, d]
        self.b2 = _frozen(last.bias)

    def _decay_tables(self, width: int) -> tuple[np.ndarray, np.ndarray]:
        """``recency_weights`` by rank (0 = most recent real item) for ``width`` slots, with a 0
        at index ``width`` for padding slots; and their sums over the n most recent, n = 0..width
        (the decay pooling's normaliser; 1e-6 for n = 0, its clamp)."""
        rank = torch.arange(width + 1, dtype=torch.float32)
        by_rank = torch.pow(0.5, rank / self.half_life)  # as recency_weights computes them, in float32
        by_rank[width] = 0.0
        total = torch.cat([torch.zeros(1), torch.cumsum(by_rank[:width], 0)]).clamp_min(1e-6)
        return _frozen(by_rank), _frozen(total)

    def context(self, user_attrs: np.ndarray, hists: Sequence[np.ndarray]) -> np.ndarray:
        """``TwoTower.user_context``: pooled attributes ⊕ pooled history, float32 [B, c], from
        the 0-padded int array ``user_attrs[B, A]`` and the histories (see ``history_context``)."""
        attrs = self.attribute_context(user_attrs)
        return np.concatenate([attrs, self.history_context(hists)], axis=1) if self.use_history else attrs

    def attribute_context(self, user_attrs: np.ndarray) -> np.ndarray:
        """Mean of the attribute embeddings over the non-zero ids of ``user_attrs[B, A]``: [B, e]
        (0 where none, as embedding_bag with padding_idx=0)."""
        n = np.count_nonzero(user_attrs, axis=1)[:, None]
        return self.attr_table[user_attrs].sum(axis=1) / np.maximum(n, 1).astype(np.float32)

    def history_context(self, hists: Sequence[np.ndarray]) -> np.ndarray:
        """``pool_history`` of the item-ID embeddings of each history's newest ``history_len``
        entries (item_idx ints, oldest first; 0 = an item the version does not know, skipped
        but holding its slot, as in the 0-padded ``hist[B, L]`` of the torch tower): float32
        [B, e], or [B, 2e] for ``mean+decay``. Always one [B, L] matrix: each row's result is
        then the same whatever other histories share the call (the hourly update relies on
        that; streaming.update)."""
        return self._pool_matrix(history_matrix(hists, self.history_len))

    def _pool_matrix(self, hist: np.ndarray) -> np.ndarray:
        """The same for a 0-padded ``hist[B, L]``, L <= ``history_len``."""
        batch, width = hist.shape
        if width == 0:
            return np.zeros((batch, self.item_table.shape[1] * (2 if self.pooling == "mean+decay" else 1)), dtype=np.float32)
        real = hist > 0
        seen = np.cumsum(real, axis=1)  # real items up to each slot; the last column counts them all
        n = seen[:, -1]
        emb = self.item_table[hist]  # [B, L, e]; padding gathers the zero row
        parts = []
        if self.pooling in ("mean", "mean+decay"):
            parts.append(emb.sum(axis=1) / np.maximum(n, 1).astype(np.float32)[:, None])
        if self.pooling in ("decay", "mean+decay"):
            # rank of a real slot = the real items after it; padding slots read the trailing 0
            w = self.decay_by_rank[np.where(real, n[:, None] - seen, len(self.decay_by_rank) - 1)]
            pooled = np.matmul(w[:, None, :], emb)[:, 0]
            pooled /= self.decay_total[n][:, None]
            parts.append(pooled)
        return np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]

    def hidden_context(self, context: np.ndarray) -> np.ndarray:
        """The context's share of the first layer, bias included: float32 [..., hidden] for
        ``context[..., c]``."""
        out = np.matmul(context, self.w_context_t)
        out += self.b1
        return out

    def row_forward(self, rows: np.ndarray, hidden_context: np.ndarray, scale: float = 1.0) -> RowPass:
        """``scale`` x the unit user vectors of ID rows ``rows[..., e]``, in ``RowPass.v`` [..., d]
        (the update passes 1 / temperature, so the output times an item vector is its logit).
        Leading axes are batch axes (the update passes [blocks, users, e]); every product is a
        matmul and every reduction runs over the last axis, so a row's result does not depend
        on the rows beside it."""
        h = np.matmul(rows, self.w_row_t)
        h += hidden_context
        z = np.matmul(np.maximum(h, np.float32(0.0)), self.w2_t)
        z += self.b2
        # F.normalize: z / max(|z|, 1e-12)
        norm = np.sqrt((z * z).sum(axis=-1, keepdims=True))
        coef = np.float32(scale) / np.maximum(norm, np.float32(1e-12), out=norm)
        z *= coef
        return RowPass(z, h, coef, np.float32(1.0 / (scale * scale)))

    def row_backward(self, g: np.ndarray, fwd: RowPass) -> np.ndarray:
        """Gradient of ``sum(g * v)`` with respect to the rows: float32 [..., e] for ``g[..., d]``.
        With v = s u:  dz = (s / |z|) (g - v (v . g) / s^2)."""
        v = fwd.v
        dz = v * ((v * g).sum(axis=-1, keepdims=True) * fwd.inv_scale2)
        np.subtract(g, dz, out=dz)
        dz *= fwd.coef
        dh = np.matmul(dz, self.w2)
        np.multiply(dh, fwd.h > 0, out=dh)  # relu
        return np.matmul(dh, self.w_row)


def history_matrix(hists: Sequence[np.ndarray], width: int) -> np.ndarray:
    """Histories (item_idx, oldest first) -> int64 ``[B, width]``: the newest ``width`` of
    each, left-aligned, 0-padded (the layout of models.features.history_tensor)."""
    out = np.zeros((len(hists), width), dtype=np.int64)
    for b, h in enumerate(hists):
        n = min(len(h), width)
        if n:
            out[b, :n] = h[len(h) - n :]
    return out


def _frozen(t: torch.Tensor) -> np.ndarray:
    """A read-only float32 C-contiguous copy (the model's own tensors stay untouched)."""
    a = np.array(t.detach().numpy(), dtype=np.float32, order="C", copy=True)
    a.flags.writeable = False
    return a


def _padded_table(table: nn.Embedding) -> np.ndarray:
    """An embedding table whose row 0 (padding, which pooling skips) is zero, so that a plain
    sum skips it too: a read-only view of the model's float32 weight when its row 0 is zero
    already (as training keeps it: no memory for a second copy of the table), else a copy
    with row 0 zeroed."""
    weight = table.weight.detach()
    if weight.dtype == torch.float32 and weight.is_contiguous() and not bool(weight[0].any()):
        view = weight.numpy().view()
        view.flags.writeable = False
        return view
    a = np.array(weight.numpy(), dtype=np.float32, order="C", copy=True)
    a[0] = 0.0
    a.flags.writeable = False
    return a


@torch.no_grad()
def corpus_item_vectors(model: TwoTower, item_attrs: torch.Tensor, batch_size: int = 8192) -> torch.Tensor:
    """Item vectors of the whole corpus, ``[n_items + 1, d]`` float32, row 0 (padding) all zeros.

    ``item_attrs[n_items + 1, A]`` is the attribute table indexed by item_idx.
    """
    was_training = model.training
    model.eval()
    out = torch.zeros(model.n_items + 1, model.cfg.dim)
    for start in range(1, model.n_items + 1, batch_size):
        idx = torch.arange(start, min(start + batch_size, model.n_items + 1))
        out[idx] = model.item_vectors(idx, item_attrs[idx])
    model.train(was_training)
    return out


def model_config_dict(model: TwoTower) -> dict:
    """What ``config.json`` holds: the ModelConfig fields plus the sizes that rebuild the model."""
    from dataclasses import asdict

    return {
        "model": asdict(model.cfg),
        "n_users": model.n_users,
        "n_items": model.n_items,
        "n_attrs": model.n_attrs,
        "history_len": model.history_len,
    }


def build_from_config(config: dict) -> TwoTower:
    """A fresh (untrained) TwoTower from a ``config.json`` dict; unknown ModelConfig keys are an error."""
    cfg = ModelConfig(**config["model"])
    return TwoTower(cfg, config["n_users"], config["n_items"], config["n_attrs"], config["history_len"])


def load_model(artifact_dir: Path) -> TwoTower:
    """The trained model of an artifact directory, in eval mode, on CPU.

    Weights are read with ``torch.load(weights_only=True)``: a tampered artifact cannot run code.
    """
    artifact_dir = Path(artifact_dir)
    config = json.loads((artifact_dir / ARTIFACT_FILES["config"]).read_text())
    model = build_from_config(config)
    state = torch.load(artifact_dir / ARTIFACT_FILES["model"], map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()

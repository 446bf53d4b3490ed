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
from pathlib import Path

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
        history, ``[B, e * (1 + history width)]``. The hourly update computes it once per hour,
        since only the row moves between its steps."""
        parts = [pooled_embeddings(self.attr_embedding, user_attrs)]
        if self.use_history:
            parts.append(pool_history(self.item_id_embedding, hist, self.cfg.pooling, self.cfg.decay_half_life))
        return torch.cat(parts, dim=-1)

    def user_vectors_from_context(self, id_rows: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """User vectors ``[B, d]`` (unit norm) from ID rows ``[B, e]`` and ``user_context`` ``[B, c]``."""
        return F.normalize(self.user_mlp(torch.cat([id_rows, context], dim=-1)), dim=-1)

    def user_row_map(self, context: torch.Tensor):
        """For a fixed ``context[B, c]``: the function ``id_rows[B, e] -> user vectors [B, d]``
        (eval mode), with the context's share of the first layer computed once. The hourly
        update calls it every step, where only the rows move. Equal to
        ``user_vectors_from_context`` up to float rounding (the first layer's sum is split)."""
        first, act, _dropout, last = self.user_mlp
        e = self.user_id_embedding.weight.shape[1]
        w_row = first.weight[:, :e]
        context_pre = F.linear(context, first.weight[:, e:], first.bias)

        def user_vectors(id_rows: torch.Tensor) -> torch.Tensor:
            return F.normalize(last(act(F.linear(id_rows, w_row) + context_pre)), dim=-1)

        return user_vectors

    def user_row_map_with_grad(self, context: torch.Tensor):
        """Like ``user_row_map``, with its backward written out: the returned function maps
        ``id_rows[B, e]`` to ``(user vectors [B, d], vjp)`` where ``vjp(g[B, d])`` is the gradient
        of ``sum(g * u)`` with respect to the rows, ``[B, e]``. No autograd graph: the hourly
        update runs this a few times per hour on a few hundred rows, where the engine's per-op
        bookkeeping cost more than the arithmetic. Eval mode (dropout is the identity).

        u = z / |z|, z = W2 relu(h) + b2, h = W1_row r + (context share); so
        dz = (g - u (u . g)) / |z|,  dh = (dz W2) * [h > 0],  dr = dh W1_row.
        """
        first, _act, _dropout, last = self.user_mlp
        e = self.user_id_embedding.weight.shape[1]
        w_row = first.weight[:, :e]
        w_out, b_out = last.weight, last.bias
        with torch.no_grad():
            context_pre = F.linear(context, first.weight[:, e:], first.bias)

        @torch.no_grad()
        def forward(id_rows: torch.Tensor):
            h = torch.addmm(context_pre, id_rows, w_row.T)
            a = torch.relu(h)
            z = torch.addmm(b_out, a, w_out.T)
            norm = z.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # F.normalize's eps
            u = z / norm

            def vjp(g: torch.Tensor) -> torch.Tensor:
                dz = (g - u * (u * g).sum(-1, keepdim=True)) / norm
                dh = (dz @ w_out).mul_(h > 0)
                return dh @ w_row

            return u, vjp

        return forward

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

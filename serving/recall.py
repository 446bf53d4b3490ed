"""Serving-side recall: top-k items for one user from Redis + the version's artifact directory.

    pointer -> version metadata (artifact_dir) -> model, index, vocabularies (cached per version)
    user-ID row and history from Redis -> user tower (row injected) -> Faiss search -> minus history

Nothing else is read: no prepared data, no training state. A user the serving version has no
row for is a cold start, not an error: the model's out-of-vocabulary row 0 stands in for the
ID embedding, and whatever history Redis holds (the stream writes it) is still used.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow.parquet as pq
import redis
import torch

from jobs.index import load_index, read_index_meta, search_params
from jobs.index_params import search_k
from models.features import FeatureTables, history_tensor, load_feature_tables
from models.towers import TwoTower, load_model
from twotower import redis_keys
from twotower.config import ServingConfig, Settings
from twotower.contracts import ARTIFACT_FILES

log = logging.getLogger(__name__)

VERSION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
"""What a version name looks like (``20240131-1a2b3c4d``): it is part of Redis keys and paths,
so braces (hash tags), colons, glob characters, slashes and blanks are never accepted."""


class NothingPublished(RuntimeError):
    """No version is serving yet (run the nightly job first)."""


@dataclass(frozen=True)
class VersionAssets:
    """Everything recall needs from one artifact directory, loaded once per version."""

    version: str
    model: TwoTower
    index: Any  # faiss CPU index, nprobe (and re-ranking depth) set
    features: FeatureTables
    item_ids: np.ndarray  # object [n_items + 1]: item_id of each item_idx (slot 0 unused)
    item_idx_of: dict[str, int]
    user_idx_of: dict[str, int]
    history_len: int
    index_meta: dict[str, Any]


@dataclass(frozen=True)
class RecallResult:
    """Top-k of one request and how it was served."""

    version: str
    user_id: str
    known_user: bool  # the serving version has a row for the user
    history_used: int  # history items fed to the user tower
    items: list[tuple[str, float]]  # (item_id, inner-product score), best first


def user_id_problem(user_id: str, cfg: ServingConfig) -> str | None:
    """Why ``user_id`` cannot be served, or None. Pure; the rule the stream consumer applies to
    ids (streaming.events), so every id it accepts can be served."""
    if user_id.strip() == "":
        return "user_id is empty"
    if len(user_id) > cfg.max_user_id_len:
        return f"user_id has {len(user_id)} characters; at most {cfg.max_user_id_len} are accepted"
    if user_id != user_id.strip() or any(ord(c) < 32 or ord(c) == 127 or 0xD800 <= ord(c) <= 0xDFFF for c in user_id):
        return "user_id contains control characters or surrounding blanks"
    return None


def k_problem(k: Any, cfg: ServingConfig) -> str | None:
    """Why ``k`` is not a candidate count this server answers, or None. Pure."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        return f"k must be an integer between 1 and {cfg.max_k}, got {k!r}"
    if not 1 <= int(k) <= cfg.max_k:
        return f"k must be between 1 and {cfg.max_k}, got {k}"
    return None


def validate_request(user_id: Any, k: Any, cfg: ServingConfig) -> tuple[str, int]:
    """Checked (user_id, k) against ``serving.max_k`` and ``serving.max_user_id_len``;
    ValueError saying what is wrong otherwise."""
    if not isinstance(user_id, str) or not user_id:
        raise ValueError("user_id must be a non-empty string")
    problem = user_id_problem(user_id, cfg) or k_problem(k, cfg)
    if problem:
        raise ValueError(problem)
    return user_id, int(k)


@functools.lru_cache(maxsize=4)  # current + previous, and a little slack while the pointer moves
def load_assets(artifact_dir: str, version: str) -> VersionAssets:
    """Load model, index and vocabularies of a version (cached by directory and version)."""
    path = Path(artifact_dir)
    model = load_model(path)
    items = pq.read_table(path / ARTIFACT_FILES["vocab_items"], columns=["item_id", "idx"])
    users = pq.read_table(path / ARTIFACT_FILES["vocab_users"], columns=["user_id", "idx"])
    item_ids = np.empty(model.n_items + 1, dtype=object)
    item_ids[items["idx"].to_numpy()] = items["item_id"].to_pylist()
    assets = VersionAssets(
        version=version,
        model=model,
        index=load_index(path),
        features=load_feature_tables(path, model.n_users, model.n_items),
        item_ids=item_ids,
        item_idx_of=dict(zip(items["item_id"].to_pylist(), items["idx"].to_pylist())),
        user_idx_of=dict(zip(users["user_id"].to_pylist(), users["idx"].to_pylist())),
        history_len=model.history_len,
        index_meta=read_index_meta(path),
    )
    log.info("recall: loaded version %s from %s (%s items, %s users)", version, path, f"{model.n_items:,}", f"{model.n_users:,}")
    return assets


def serving_assets(client: redis.Redis, prefix: str) -> VersionAssets:
    """Assets of the version the pointer names now."""
    current = client.hget(redis_keys.pointer(prefix), "current")
    if not current:
        raise NothingPublished("no model version is published in Redis yet (run `make run` or the nightly DAG first)")
    version = current.decode(errors="replace")
    if not VERSION_NAME.match(version):
        raise RuntimeError(f"the pointer names {version[:80]!r}, which is not a version name; refusing to load it")
    raw = client.get(redis_keys.version_meta(prefix, version))
    if raw is None:
        raise RuntimeError(f"the pointer names version {version} but its metadata key is missing")
    return load_assets(json.loads(raw)["artifact_dir"], version)


@torch.no_grad()
def user_vector(assets: VersionAssets, user_id: str, row: bytes | None, history: list[str]) -> tuple[np.ndarray, list[int]]:
    """The user's vector ``[1, d]`` and the item_idx of the history used.

    ``row``: float32 LE bytes from Redis, or None for the cold-start (OOV row 0) answer;
    ``history``: item ids, oldest first (unknown items are skipped).
    """
    model = assets.model
    if row is not None:
        id_row = torch.from_numpy(np.frombuffer(row, dtype="<f4").copy())
        if id_row.numel() != model.cfg.id_dim:
            raise ValueError(f"user {user_id!r}: Redis row has {id_row.numel()} values, the model expects {model.cfg.id_dim}")
    else:
        id_row = model.user_id_embedding.weight[0].detach().clone()
    hist = [assets.item_idx_of[i] for i in history if i in assets.item_idx_of][-assets.history_len :]
    user_idx = torch.tensor([assets.user_idx_of.get(user_id, 0)], dtype=torch.long)
    attrs = assets.features.users(user_idx)
    vec = model.user_vectors_from_rows(id_row[None, :], attrs, history_tensor([hist], assets.history_len))
    return vec.numpy().astype(np.float32), hist


def search_ids(index: Any, vec: np.ndarray, exclude: set[int], k: int, n_items: int) -> list[tuple[int, float]]:
    """Top ``k`` (item_idx, score) for ``vec[1, d]``, items in ``exclude`` removed.

    An IVF index only returns items of the ``nprobe`` lists it probes; on a small corpus a large
    ``k`` can exceed them (MovieLens: 8 of 32 lists hold ~420 of 1,682 items). Then nprobe is
    doubled for this call only (jobs.index.search_params: the shared index is not modified, so
    concurrent requests are unaffected, and an exact re-ranking stage keeps its depth) until
    ``k`` items remain or every list is probed.
    """
    fetch = search_k(k, len(exclude), n_items)
    ivf = faiss.try_extract_index_ivf(index)  # through the IDMap and the re-ranking stage; None: exact
    nprobe = ivf.nprobe if ivf is not None else 0
    while True:
        scores, ids = index.search(vec, fetch, params=search_params(index, nprobe))
        found = [(int(i), float(sc)) for sc, i in zip(scores[0], ids[0]) if i > 0 and int(i) not in exclude][:k]
        if len(found) >= k or ivf is None or nprobe >= ivf.nlist:
            return found
        nprobe = min(2 * max(nprobe, 1), ivf.nlist)


def search(assets: VersionAssets, vec: np.ndarray, exclude: set[int], k: int) -> list[tuple[str, float]]:
    """Top ``k`` (item_id, score) through the version's index, items in ``exclude`` removed."""
    found = search_ids(assets.index, vec, exclude, k, assets.model.n_items)
    return [(str(assets.item_ids[i]), score) for i, score in found]


def recall_with_info(settings: Settings, user_id: str, k: int, client: redis.Redis | None = None) -> RecallResult:
    """Top-k for ``user_id`` with the serving version and whether the user was known."""
    from jobs.redis_conn import redis_client

    user_id, k = validate_request(user_id, k, settings.serving)
    own = client is None
    client = client or redis_client(settings)
    try:
        prefix = settings.redis.prefix
        assets = serving_assets(client, prefix)
        pipe = client.pipeline(transaction=False)
        pipe.hget(redis_keys.user_row(prefix, assets.version, user_id), "e")
        pipe.zrange(redis_keys.user_history(prefix, user_id), -assets.history_len, -1)
        row, members = pipe.execute()
    finally:
        if own:
            client.close()
    history = [redis_keys.history_item(m) for m in members]
    vec, hist = user_vector(assets, user_id, row, history)
    items = search(assets, vec, set(hist), k)
    return RecallResult(assets.version, user_id, row is not None, len(hist), items)


def recall(settings: Settings, user_id: str, k: int, client: redis.Redis | None = None) -> list[tuple[str, float]]:
    """Top-``k`` (item_id, score) for ``user_id`` (1 <= k <= ``serving.max_k``, an id of at most
    ``serving.max_user_id_len`` characters)."""
    return recall_with_info(settings, user_id, k, client).items

"""The model version the incremental consumer updates rows for: what it needs, loaded once.

Redis pointer (``current``) -> version metadata (``<p>:version:<v>``, JSON written by
jobs.publish) -> artifact directory -> frozen model, corpus item vectors, vocabularies and
user attributes. The consumer reloads when the pointer moves.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from twotower.config import Settings
from twotower.contracts import ARTIFACT_FILES

log = logging.getLogger(__name__)

ARTIFACT_DIR_KEYS = ("artifact_dir", "artifact_path", "artifact")
CUTOFF_KEYS = ("data_cutoff_ms",)


@dataclass
class LoadedVersion:
    """A frozen model version and its lookup tables (CPU tensors)."""

    version: str
    artifact_dir: Path
    data_cutoff_ms: int
    model: torch.nn.Module
    item_vectors: torch.Tensor
    """float32 [n_items + 1, d], row 0 padding."""
    item_index: dict[str, int]
    user_index: dict[str, int]
    user_attrs: torch.Tensor
    """int64 [n_users + 1, A]; row 0 (unknown user) all padding."""
    history_len: int

    @cached_property
    def update_arrays(self):
        """The numpy arrays the hourly update reads (streaming.update.RowUpdateArrays), made on
        first use; a ``dataclasses.replace`` copy makes its own."""
        from streaming.update import RowUpdateArrays

        return RowUpdateArrays(self.model, self.item_vectors, self.user_attrs)

    @property
    def id_dim(self) -> int:
        return int(self.model.user_id_embedding.weight.shape[1])

    def model_row(self, user_idx: int) -> np.ndarray:
        """The trained ID row of a vocabulary user (0 = the out-of-vocabulary / cold-start row)."""
        return self.model.user_id_embedding.weight[user_idx].detach().numpy().astype(np.float32, copy=True)

    def attrs_of(self, user_idx: list[int]) -> torch.Tensor:
        idx = torch.tensor(user_idx, dtype=torch.long)
        ok = idx < len(self.user_attrs)
        return self.user_attrs[torch.where(ok, idx, torch.zeros_like(idx))]

    def item_idx(self, item_ids: list[str]) -> list[int]:
        """Vocabulary index of each item id, 0 for items this version does not know."""
        return [self.item_index.get(i, 0) for i in item_ids]


def resolve_artifact_dir(settings: Settings, version: str, meta: dict) -> Path:
    """The version's artifact directory: from its metadata, else ``artifacts/<version>``."""
    for key in ARTIFACT_DIR_KEYS:
        value = meta.get(key)
        if isinstance(value, str) and value and Path(value).is_dir():
            return Path(value)
    return settings.paths.artifacts_dir / version


def data_cutoff_of(meta: dict, manifest: dict) -> int:
    """The version's data cutoff (epoch ms, exclusive), from its metadata or artifact manifest."""
    for source in (meta, manifest, manifest.get("prepared_manifest", {}), manifest.get("prepared", {})):
        for key in CUTOFF_KEYS:
            if isinstance(source, dict) and source.get(key) is not None:
                return int(source[key])
    raise ValueError("the version names no data_cutoff_ms (neither its Redis metadata nor its manifest.json)")


def _vocab(path: Path, key: str) -> dict[str, int]:
    table = pq.read_table(path, columns=[key, "idx"])
    return dict(zip(table[key].to_pylist(), table["idx"].to_pylist()))


def load_version(settings: Settings, version: str, meta: dict) -> LoadedVersion:
    """Load everything the update needs from the version's artifact directory."""
    from models.features import load_feature_tables
    from models.towers import load_model
    from streaming.update import freeze

    artifact_dir = resolve_artifact_dir(settings, version, meta)
    if not (artifact_dir / ARTIFACT_FILES["model"]).exists():
        raise FileNotFoundError(f"model version {version}: no {ARTIFACT_FILES['model']} in {artifact_dir}")
    manifest_path = artifact_dir / ARTIFACT_FILES["manifest"]
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    model = freeze(load_model(artifact_dir))
    vectors = np.load(artifact_dir / ARTIFACT_FILES["item_embeddings"]).astype(np.float32)
    tables = load_feature_tables(artifact_dir, model.n_users, model.n_items)
    loaded = LoadedVersion(
        version=version,
        artifact_dir=artifact_dir,
        data_cutoff_ms=data_cutoff_of(meta, manifest),
        model=model,
        item_vectors=torch.from_numpy(vectors),
        item_index=_vocab(artifact_dir / ARTIFACT_FILES["vocab_items"], "item_id"),
        user_index=_vocab(artifact_dir / ARTIFACT_FILES["vocab_users"], "user_id"),
        user_attrs=tables.user_attrs,
        history_len=int(model.history_len),
    )
    log.info(
        "loaded model version %s from %s: %d users, %d items, data cutoff %s",
        version, artifact_dir, len(loaded.user_index), len(loaded.item_index), _iso(loaded.data_cutoff_ms),
    )
    return loaded


def _iso(ms: int) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.timezone.utc).strftime("%Y-%m-%dT%H:%MZ")

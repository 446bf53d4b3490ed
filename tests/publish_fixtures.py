"""Test helpers for the index, publish, gate, status and recall tests: synthetic clustered
vectors, and small but real model versions (trained, evaluated and indexed by the real jobs on
the tiny prepared partition of tests.model_fixtures)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from tests.model_fixtures import write_tiny_prepared
from twotower.config import Settings
from twotower.contracts import ARTIFACT_FILES


def clustered_vectors(n: int, d: int, n_clusters: int, spread: float = 0.7, seed: int = 0) -> np.ndarray:
    """``n`` unit vectors around ``n_clusters`` random unit centres (noise norm ~``spread``)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[rng.integers(0, n_clusters, n)] + rng.normal(0.0, spread / np.sqrt(d), size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def vector_artifact(directory: Path, vectors: np.ndarray) -> Path:
    """A directory holding only item_embeddings.npy (row 0 = padding), as the index job reads it."""
    directory.mkdir(parents=True, exist_ok=True)
    emb = np.vstack([np.zeros((1, vectors.shape[1]), np.float32), vectors])
    np.save(directory / ARTIFACT_FILES["item_embeddings"], emb)
    return directory


def tiny_settings(settings: Settings) -> Settings:
    """Small model, one epoch, one thread each for torch and Faiss (the test machine is shared)."""
    s = settings.replace("model", dim=8, id_dim=8, hidden=16)
    s = s.replace("train", epochs=1, batch_size=16, threads=1)
    return s.replace("index", threads=1)


def tiny_version(settings: Settings) -> tuple[Path, Path]:
    """(artifact_dir, prepared_dir) of a real version: prepared -> train -> evaluate -> index."""
    from jobs.evaluate import evaluate_exact
    from jobs.index import build_index
    from jobs.train import train_version

    prepared = write_tiny_prepared(settings.paths.prepared_dir)
    artifact = train_version(settings, prepared)
    evaluate_exact(settings, artifact, prepared)
    build_index(settings, artifact, prepared)
    return artifact, prepared


def clone_version(artifact_dir: Path, name: str, data_cutoff_ms: int, row_scale: float) -> Path:
    """Another version: the same model with user-ID rows scaled by ``row_scale`` and another
    data cutoff, under ``name`` next to ``artifact_dir``."""
    target = artifact_dir.parent / name
    shutil.copytree(artifact_dir, target)
    manifest_path = target / ARTIFACT_FILES["manifest"]
    manifest = json.loads(manifest_path.read_text())
    manifest.update(version=name, data_cutoff_ms=data_cutoff_ms)
    manifest_path.write_text(json.dumps(manifest))
    state = torch.load(target / ARTIFACT_FILES["model"], weights_only=True)
    state["user_id_embedding.weight"] = state["user_id_embedding.weight"] * row_scale
    torch.save(state, target / ARTIFACT_FILES["model"])
    return target

"""Nightly training stage: a prepared partition -> a versioned model artifact directory.

    artifacts/<version>/  model.pt, config.json, item_embeddings.npy, manifest.json,
                          vocab_users/vocab_items/users/items.parquet (copies)

The version is ``<YYYYMMDD of D>-<8 hex of sha256(prepared manifest + model and train config)>``,
so re-running the same date with the same config names the same version; the weights, item
embeddings, config and copied tables come out byte-identical (same seed, data and threads);
only the timing fields of manifest.json differ. The directory is written to a temporary
name and renamed into place: readers see the old version or the new one, never half of one,
and a failed run (a diverged loss included) leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from models.data import log_sampling_prob, read_examples, read_item_counts, read_manifest
from models.features import load_feature_tables
from models.towers import corpus_item_vectors, model_config_dict
from models.trainer import TrainResult, fit
from twotower.atomic import atomic_write_dir
from twotower.config import ModelConfig, Settings, TrainConfig
from twotower.contracts import ARTIFACT_FILES, parse_day

log = logging.getLogger(__name__)

COPIED_TABLES = ("vocab_users", "vocab_items", "users", "items")


def version_name(prepared_manifest: dict, model_cfg: ModelConfig, train_cfg: TrainConfig) -> str:
    """``YYYYMMDD-<8 hex>`` from the logical date and a hash of data and config. Pure."""
    day = parse_day(prepared_manifest["logical_date"])
    payload = json.dumps(
        {"prepared": prepared_manifest, "model": asdict(model_cfg), "train": asdict(train_cfg)},
        sort_keys=True,
        default=str,
    )
    return f"{day:%Y%m%d}-{hashlib.sha256(payload.encode()).hexdigest()[:8]}"


def train_version(settings: Settings, prepared_dir: Path) -> Path:
    """Train from scratch on a complete prepared partition; returns ``artifacts/<version>/``.

    Raises FileNotFoundError for an incomplete partition, models.trainer.TrainingDiverged when
    the loss goes NaN (nothing written), ValueError for an empty train split.
    """
    prepared_dir = Path(prepared_dir)
    manifest = read_manifest(prepared_dir)
    version = version_name(manifest, settings.model, settings.train)
    sizes = {k: int(manifest[k]) for k in ("n_users", "n_items", "n_attrs", "history_len")}
    log.info(
        "training version %s on prepared %s (%s train examples, %s users, %s items)",
        version, prepared_dir, f"{manifest['n_train']:,}", f"{sizes['n_users']:,}", f"{sizes['n_items']:,}",
    )  # fmt: skip

    examples = read_examples(prepared_dir, "train", sizes["history_len"])
    features = load_feature_tables(prepared_dir, sizes["n_users"], sizes["n_items"])
    log_q = log_sampling_prob(read_item_counts(prepared_dir, sizes["n_items"]))
    result = fit(settings.model, settings.train, examples, features, log_q, sizes)
    item_vecs = corpus_item_vectors(result.model, features.item_attrs).numpy().astype(np.float32)

    target = settings.paths.artifacts_dir / version
    write_artifact(target, prepared_dir, result, item_vecs, artifact_manifest(version, manifest, settings, result))
    log.info(
        "version %s written to %s: %.1f s of training at %s samples/s, %s user rows set to the OOV row",
        version, target, result.seconds, f"{result.samples_per_s:,.0f}", f"{result.users_without_examples:,}",
    )  # fmt: skip
    return target


def artifact_manifest(version: str, prepared_manifest: dict, settings: Settings, result: TrainResult) -> dict:
    """manifest.json: what the version is, which data it saw, how it was trained."""
    return {
        "version": version,
        "logical_date": prepared_manifest["logical_date"],
        "data_cutoff_ms": prepared_manifest["data_cutoff_ms"],
        "prepared_manifest": prepared_manifest,
        "model": asdict(settings.model),
        "train": asdict(settings.train),
        "seed": settings.train.seed,
        "threads": result.threads,
        "torch_version": torch.__version__,
        "epoch_loss": [round(x, 6) for x in result.epoch_loss],
        # vocabulary users without a training example: their ID row is a copy of row 0 (OOV)
        "users_without_examples": result.users_without_examples,
        # timing fields: the only ones that differ between two runs of the same version
        "trained_at": round(time.time(), 3),
        "train_seconds": round(result.seconds, 3),
        "samples_per_s": round(result.samples_per_s, 1),
    }


def write_artifact(target: Path, prepared_dir: Path, result: TrainResult, item_vecs: np.ndarray, manifest: dict) -> None:
    """Write the whole artifact directory under a temporary name, then rename it to ``target``
    (replacing an earlier run of the same version)."""
    target.parent.mkdir(parents=True, exist_ok=True)

    def fill(tmp: Path) -> None:
        torch.save(result.model.state_dict(), tmp / ARTIFACT_FILES["model"])
        (tmp / ARTIFACT_FILES["config"]).write_text(json.dumps(model_config_dict(result.model), indent=2, sort_keys=True) + "\n")
        np.save(tmp / ARTIFACT_FILES["item_embeddings"], item_vecs)
        for name in COPIED_TABLES:
            shutil.copyfile(prepared_dir / ARTIFACT_FILES[name], tmp / ARTIFACT_FILES[name])
        (tmp / ARTIFACT_FILES["manifest"]).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")

    atomic_write_dir(target, fill)

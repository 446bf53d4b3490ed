"""Training job: determinism, the artifact directory, atomicity, divergence handling."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

from jobs.train import train_version, version_name
from models.towers import load_model
from models.trainer import TrainingDiverged, learning_rate, users_without_examples
from tests.model_fixtures import write_tiny_prepared
from twotower.config import Settings, TrainConfig
from twotower.contracts import ARTIFACT_FILES

TRAINED_FILES = ("model", "config", "item_embeddings", "manifest", "vocab_users", "vocab_items", "users", "items")


@pytest.fixture
def tiny(settings: Settings):
    """(settings for a tiny fast model, a tiny prepared partition)."""
    s = settings.replace("model", dim=8, id_dim=8, hidden=16).replace("train", epochs=1, batch_size=16, threads=1)
    return s, write_tiny_prepared(s.paths.prepared_dir)


def test_same_seed_and_data_give_bitwise_identical_artifacts(tiny, tmp_path):
    s, prepared = tiny
    first = train_version(s, prepared)
    files = {name: (first / ARTIFACT_FILES[name]).read_bytes() for name in TRAINED_FILES if name != "manifest"}
    other = s.replace("paths", state_dir=tmp_path / "elsewhere")
    second = train_version(other, prepared)
    assert second.name == first.name
    for name, data in files.items():
        assert (second / ARTIFACT_FILES[name]).read_bytes() == data, name
    a = torch.load(first / "model.pt", weights_only=True)
    b = torch.load(second / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_rerun_replaces_the_version_in_place(tiny):
    s, prepared = tiny
    first = train_version(s, prepared)
    (first / "stale.txt").write_text("from an earlier run")
    weights = (first / "model.pt").read_bytes()
    again = train_version(s, prepared)
    assert again == first
    assert not (again / "stale.txt").exists()
    assert (again / "model.pt").read_bytes() == weights
    assert [p.name for p in s.paths.artifacts_dir.iterdir()] == [first.name]  # no temp dirs left


def test_another_seed_gives_other_weights_and_another_version(tiny):
    s, prepared = tiny
    a = train_version(s, prepared)
    b = train_version(s.replace("train", seed=7), prepared)
    assert a.name != b.name
    wa = torch.load(a / "model.pt", weights_only=True)["item_id_embedding.weight"]
    wb = torch.load(b / "model.pt", weights_only=True)["item_id_embedding.weight"]
    assert not torch.equal(wa, wb)


def test_artifact_holds_what_the_other_stages_read(tiny):
    s, prepared = tiny
    art = train_version(s, prepared)
    for name in TRAINED_FILES:
        assert (art / ARTIFACT_FILES[name]).is_file(), name
    assert re.fullmatch(r"20240130-[0-9a-f]{8}", art.name)

    vecs = np.load(art / ARTIFACT_FILES["item_embeddings"])
    assert vecs.dtype == np.float32 and vecs.shape == (30 + 1, 8)
    assert not vecs[0].any()
    assert np.allclose(np.linalg.norm(vecs[1:], axis=1), 1.0, atol=1e-5)

    model = load_model(art)
    from models.features import load_feature_tables

    items = load_feature_tables(art).item_attrs
    with torch.no_grad():
        again = model.item_vectors(torch.arange(1, 31), items[1:31]).numpy()
    assert np.allclose(again, vecs[1:], atol=1e-6)

    config = json.loads((art / "config.json").read_text())
    assert (config["n_users"], config["n_items"], config["n_attrs"], config["history_len"]) == (24, 30, 7, 5)
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["version"] == art.name and manifest["seed"] == 42 and manifest["threads"] == 1
    assert manifest["data_cutoff_ms"] == 1_706_572_800_000 + 86_400_000
    assert manifest["prepared_manifest"]["n_train"] == json.loads((prepared / "manifest.json").read_text())["n_train"]
    assert manifest["samples_per_s"] > 0 and len(manifest["epoch_loss"]) == 1
    assert manifest["users_without_examples"] == 0  # every tiny user has train examples
    assert (art / "users.parquet").read_bytes() == (prepared / "users.parquet").read_bytes()


def test_a_diverging_loss_stops_training_and_writes_nothing(tiny):
    s, prepared = tiny
    with pytest.raises(TrainingDiverged, match="nothing was written"):
        train_version(s.replace("train", lr=1e30, epochs=3), prepared)
    assert not s.paths.artifacts_dir.exists() or not any(s.paths.artifacts_dir.iterdir())


def test_an_incomplete_partition_is_refused(tiny):
    s, prepared = tiny
    (prepared / "_SUCCESS").unlink()
    with pytest.raises(FileNotFoundError, match="incomplete"):
        train_version(s, prepared)


def test_streaming_logq_and_user_id_dropout_train_the_oov_row(tiny):
    s, prepared = tiny
    s = s.replace("train", logq_source="streaming", user_id_dropout=0.5, epochs=2)
    art = train_version(s, prepared)
    trained = torch.load(art / "model.pt", weights_only=True)["user_id_embedding.weight"][0]
    torch.manual_seed(s.train.seed)  # the init the run started from
    from models.towers import TwoTower

    initial = TwoTower(s.model, 24, 30, 7, 5).user_id_embedding.weight[0]
    assert not torch.allclose(trained, initial)


def test_users_without_examples_are_the_vocabulary_rows_no_example_reads():
    train_users = np.array([3, 1, 3, 5, 1], dtype=np.int64)
    got = users_without_examples(train_users, n_users=7)
    assert got.dtype == np.int64 and got.tolist() == [2, 4, 6, 7]
    assert users_without_examples(np.array([1, 2], np.int64), n_users=2).tolist() == []
    assert users_without_examples(np.zeros(0, np.int64), n_users=3).tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        users_without_examples(np.array([4], np.int64), n_users=3)


def test_a_user_without_training_example_gets_the_oov_row(tiny):
    """User 5's examples are left out of training: its row must be row 0, not its random init."""
    from models.data import log_sampling_prob, read_examples, read_item_counts
    from models.features import load_feature_tables
    from models.trainer import fit

    s, prepared = tiny
    s = s.replace("train", user_id_dropout=0.3)
    sizes = {"n_users": 24, "n_items": 30, "n_attrs": 7, "history_len": 5}
    examples = read_examples(prepared, "train", 5)
    keep = examples.user_idx != 5
    examples = type(examples)(*(getattr(examples, f)[keep] for f in ("user_idx", "item_idx", "weight", "ts", "hist")))
    features = load_feature_tables(prepared, 24, 30)
    result = fit(s.model, s.train, examples, features, log_sampling_prob(read_item_counts(prepared, 30)), sizes)
    table = result.model.user_id_embedding.weight.detach()
    assert result.users_without_examples == 1
    assert torch.equal(table[5], table[0])
    assert not any(torch.equal(table[u], table[0]) for u in range(1, 25) if u != 5)


def test_version_name_depends_on_data_and_config():
    manifest = {"logical_date": "1998-04-22", "n_train": 10}
    from twotower.config import ModelConfig

    base = version_name(manifest, ModelConfig(), TrainConfig())
    assert base.startswith("19980422-") and base == version_name(dict(manifest), ModelConfig(), TrainConfig())
    assert version_name({**manifest, "n_train": 11}, ModelConfig(), TrainConfig()) != base
    assert version_name(manifest, ModelConfig(dim=32), TrainConfig()) != base
    assert version_name(manifest, ModelConfig(), TrainConfig(epochs=3)) != base


def test_learning_rate_schedules():
    const = TrainConfig(lr=0.01, lr_schedule="constant")
    assert [learning_rate(const, s, 10) for s in (0, 9)] == [0.01, 0.01]
    cos = TrainConfig(lr=0.01, lr_schedule="cosine", warmup_frac=0.2)
    assert learning_rate(cos, 0, 10) == pytest.approx(0.005)  # warm-up: 1/2 of lr after step 1 of 2
    assert learning_rate(cos, 1, 10) == pytest.approx(0.01)
    assert learning_rate(cos, 2, 10) == pytest.approx(0.01)  # decay starts at the peak
    assert learning_rate(cos, 6, 10) == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    with pytest.raises(ValueError):
        learning_rate(TrainConfig(lr_schedule="step"), 0, 10)

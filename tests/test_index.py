"""Faiss index build: recall against exact search, fallbacks, the recall floor, files, ANN metrics."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest

from jobs.index import IndexQualityError, build_index, load_index, noisy_item_queries, recall_at_k
from tests.publish_fixtures import clustered_vectors, tiny_settings, tiny_version, vector_artifact
from twotower.config import Settings
from twotower.contracts import ARTIFACT_FILES

INDEX_JSON_FIELDS = {
    "type", "nlist", "m", "nbits", "nprobe", "ann_recall_at_100", "n_items", "dim", "device", "build_seconds", "fallback",
}  # fmt: skip


def independent_recall(index, vectors: np.ndarray, queries: np.ndarray, k: int = 100) -> float:
    """Recall@k of ``index`` against a numpy brute force (ids are row + 1)."""
    exact = np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :k] + 1
    _, got = index.search(queries, k)
    return recall_at_k(got, exact)


@pytest.fixture
def s(settings: Settings) -> Settings:
    return tiny_settings(settings)


def test_ivf_pq_on_clustered_vectors_reaches_target_recall(s, tmp_path):
    vectors = clustered_vectors(12_000, 32, n_clusters=120, seed=1)
    art = vector_artifact(tmp_path / "v1", vectors)
    meta = build_index(s, art, None)

    saved = json.loads((art / ARTIFACT_FILES["index_meta"]).read_text())
    assert INDEX_JSON_FIELDS <= saved.keys()
    assert (saved["type"], saved["nlist"], saved["m"], saved["nbits"]) == ("IVF-PQ", 256, 16, 8)
    assert saved["fallback"] is None and saved["device"] == "cpu"
    assert saved["n_items"] == 12_000 and saved["dim"] == 32
    assert saved["ann_recall_at_100"] >= s.index.target_recall
    assert 1 <= saved["nprobe"] < saved["nlist"]  # tuning stopped early, well before exhaustive search
    assert "noise" in saved["queries"]
    assert meta["ann"] is None and not (art / ARTIFACT_FILES["metrics"]).exists()
    # the tuning trace ends at the chosen nprobe, and it is the first that reached the target
    trace = saved["tuning"]
    assert trace[-1]["nprobe"] == saved["nprobe"]
    assert all(t["recall_at_100"] < s.index.target_recall for t in trace[:-1])

    index = load_index(art)
    assert faiss.extract_index_ivf(index).nprobe == saved["nprobe"]
    # measured again here with other queries and a numpy brute force: the stored recall holds
    fresh = noisy_item_queries(vectors, 500, seed=99)
    assert independent_recall(index, vectors, fresh) >= s.index.target_recall - 0.02
    assert sorted(p.name for p in art.iterdir()) == ["index.faiss", "index.json", "item_embeddings.npy"]  # no temp files


def test_small_corpus_falls_back_and_records_why(s, tmp_path):
    vectors = clustered_vectors(1682, 64, n_clusters=40, seed=2)  # MovieLens-100K's corpus size
    art = vector_artifact(tmp_path / "ml", vectors)
    meta = build_index(s, art, None)
    assert meta["type"] in ("IVF-PQ", "IVF-Flat") and meta["nlist"] == 32
    assert "1682 items < 9,984 training points" in meta["fallback"]
    if meta["type"] == "IVF-PQ":
        assert meta["nbits"] == 5 and meta["m"] == 32
    else:
        assert "tried first: IVF-PQ" in meta["fallback"]
    assert meta["ann_recall_at_100"] >= s.index.target_recall
    assert independent_recall(load_index(art), vectors, noisy_item_queries(vectors, 300, seed=5)) >= s.index.target_recall - 0.03


def test_low_bit_pq_missing_the_target_falls_back_to_ivf_flat(s, tmp_path):
    vectors = clustered_vectors(1682, 64, n_clusters=40, seed=2)
    art = vector_artifact(tmp_path / "ml", vectors)
    strict = s.replace("index", target_recall=0.999)  # 5-bit codes cannot get there; exact lists can
    meta = build_index(strict, art, None)
    assert (meta["type"], meta["nlist"], meta["m"], meta["nbits"]) == ("IVF-Flat", 32, 0, 0)
    assert "tried first: IVF-PQ IVF32,PQ32x5 reached recall@100" in meta["fallback"]
    assert meta["ann_recall_at_100"] >= 0.999


def test_tiny_corpus_uses_exact_flat(s, tmp_path):
    vectors = clustered_vectors(200, 16, n_clusters=5, seed=3)
    art = vector_artifact(tmp_path / "tiny", vectors)
    meta = build_index(s, art, None)
    assert (meta["type"], meta["nlist"], meta["nprobe"]) == ("Flat", 0, 0)
    assert meta["ann_recall_at_100"] == 1.0 and "too few" in meta["fallback"]
    index = load_index(art)
    q = noisy_item_queries(vectors, 50, seed=4)
    _, got = index.search(q, 10)
    assert np.array_equal(got, np.argsort(-(q @ vectors.T), axis=1, kind="stable")[:, :10] + 1)


def test_recall_below_floor_refuses_and_removes_the_old_index(s, tmp_path):
    vectors = clustered_vectors(10_000, 16, n_clusters=100, seed=6)
    art = vector_artifact(tmp_path / "v", vectors)
    (art / ARTIFACT_FILES["index_meta"]).write_text("{}")  # left by an earlier build
    (art / ARTIFACT_FILES["index"]).write_bytes(b"old")
    strict = s.replace("index", target_recall=0.999, recall_floor=0.999)  # 8-bit PQ codes cannot rank 100 neighbours perfectly
    with pytest.raises(IndexQualityError, match="below the floor"):
        build_index(strict, art, None)
    assert not (art / ARTIFACT_FILES["index_meta"]).exists() and not (art / ARTIFACT_FILES["index"]).exists()


def test_index_build_is_deterministic(s, tmp_path):
    vectors = clustered_vectors(2000, 16, n_clusters=20, seed=7)
    a = vector_artifact(tmp_path / "a", vectors)
    b = vector_artifact(tmp_path / "b", vectors)
    build_index(s, a, None)
    build_index(s, b, None)
    assert (a / "index.faiss").read_bytes() == (b / "index.faiss").read_bytes()


def test_ann_metrics_of_a_trained_version_are_merged_into_metrics_json(s):
    artifact, prepared = tiny_version(s)  # 30 items: exact Flat index, so ANN must equal exact
    metrics = json.loads((artifact / ARTIFACT_FILES["metrics"]).read_text())
    index_meta = json.loads((artifact / ARTIFACT_FILES["index_meta"]).read_text())
    assert index_meta["type"] == "Flat" and "evaluation split" in index_meta["queries"]
    assert set(metrics["ann"]) == set(metrics["exact"])
    assert metrics["ann"] == pytest.approx(metrics["exact"])
    assert "baselines" in metrics  # the evaluator's sections are kept


def test_pq_tuning_stops_where_recall_levels_off(s, tmp_path):
    from jobs.index import RECALL_PLATEAU

    vectors = clustered_vectors(10_000, 16, n_clusters=100, seed=6)
    art = vector_artifact(tmp_path / "v", vectors)
    unreachable = s.replace("index", target_recall=0.999, recall_floor=0.5)  # 8-bit codes cannot get there
    meta = build_index(unreachable, art, None)
    trace = [t["recall_at_100"] for t in meta["tuning"]]
    assert meta["type"] == "IVF-PQ" and meta["ann_recall_at_100"] < 0.999
    assert meta["nprobe"] < meta["nlist"]  # it did not probe every list for nothing
    assert trace[-1] - trace[-2] < RECALL_PLATEAU  # it stopped because the last step gained (almost) nothing
    assert all(b - a >= RECALL_PLATEAU for a, b in zip(trace[:-2], trace[1:-1]))  # and not before
    assert meta["nprobe"] == meta["tuning"][-1]["nprobe"]

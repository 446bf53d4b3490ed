"""Serving-side recall from Redis + the artifact directory, on a tiny trained and published model."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from jobs.publish import publish_version
from models.features import history_tensor, load_feature_tables
from models.towers import load_model
from serving.recall import NothingPublished, recall, recall_with_info
from tests.publish_fixtures import clone_version, tiny_settings, tiny_version
from twotower import redis_keys
from twotower.config import Settings, load_settings


@pytest.fixture(scope="module")
def base_version(tmp_path_factory):
    root = tmp_path_factory.mktemp("recall_base")
    return tiny_version(tiny_settings(load_settings().replace("paths", state_dir=root / "state")))


@pytest.fixture
def published(settings: Settings, base_version, redis_client):
    """(settings, artifact_dir) with the tiny version published under this test's prefix."""
    artifact, prepared = base_version
    shutil.copytree(prepared, settings.paths.prepared_dir / prepared.name)
    art = shutil.copytree(artifact, settings.paths.artifacts_dir / artifact.name)
    s = tiny_settings(settings)
    assert publish_version(s, art, client=redis_client)["switched"]
    return s, art


def expected_topk(art, id_row: torch.Tensor, user_idx: int, hist_items: list[str], k: int) -> list[tuple[str, float]]:
    """Brute force over item_embeddings.npy with the model, independent of Faiss and Redis."""
    model = load_model(art)
    feats = load_feature_tables(art, model.n_users, model.n_items)
    vocab = pq.read_table(art / "vocab_items.parquet").to_pydict()
    idx_of = dict(zip(vocab["item_id"], vocab["idx"]))
    id_of = dict(zip(vocab["idx"], vocab["item_id"]))
    hist = [idx_of[i] for i in hist_items]
    with torch.no_grad():
        u = model.user_vectors_from_rows(id_row[None], feats.users(torch.tensor([user_idx])), history_tensor([hist], model.history_len))
    items = np.load(art / "item_embeddings.npy")
    scores = items[1:] @ u.numpy()[0]
    order = [j + 1 for j in np.argsort(-scores, kind="stable") if j + 1 not in hist][:k]
    return [(id_of[j], float(scores[j - 1])) for j in order]


def check(got, want):
    assert [i for i, _ in got] == [i for i, _ in want]
    assert [sc for _, sc in got] == pytest.approx([sc for _, sc in want], abs=1e-5)


def test_known_user_gets_exact_topk_without_history_items(published, redis_client):
    s, art = published
    history = [redis_keys.history_item(m) for m in redis_client.zrange(redis_keys.user_history(s.redis.prefix, "u4"), 0, -1)]
    assert len(history) == 5
    row = load_model(art).user_id_embedding.weight[4].detach()
    got = recall(s, "u4", 10, client=redis_client)
    assert len(got) == 10 and not set(i for i, _ in got) & set(history)
    assert [sc for _, sc in got] == sorted((sc for _, sc in got), reverse=True)
    check(got, expected_topk(art, row, 4, history, 10))


def test_unknown_user_gets_the_cold_start_answer(published, redis_client):
    s, art = published
    info = recall_with_info(s, "never-seen", 7, client=redis_client)
    assert info.known_user is False and info.history_used == 0 and info.version == art.name
    check(info.items, expected_topk(art, load_model(art).user_id_embedding.weight[0].detach(), 0, [], 7))


def test_unknown_user_with_streamed_history_uses_it(published, redis_client):
    s, art = published
    key = redis_keys.user_history(s.redis.prefix, "newbie")
    redis_client.zadd(key, {redis_keys.history_member("ev-1", "i3"): 1, redis_keys.history_member("ev-2", "i6"): 2,
                            redis_keys.history_member("ev-3", "not-an-item"): 3})  # fmt: skip
    info = recall_with_info(s, "newbie", 5, client=redis_client)
    assert info.known_user is False and info.history_used == 2
    check(info.items, expected_topk(art, load_model(art).user_id_embedding.weight[0].detach(), 0, ["i3", "i6"], 5))


def test_recall_follows_the_row_in_redis(published, redis_client):
    s, art = published
    moved = load_model(art).user_id_embedding.weight[9].detach() * -1.5  # as if the hourly updater moved it
    redis_client.hset(redis_keys.user_row(s.redis.prefix, art.name, "u4"), "e", moved.numpy().astype("<f4").tobytes())
    history = [redis_keys.history_item(m) for m in redis_client.zrange(redis_keys.user_history(s.redis.prefix, "u4"), 0, -1)]
    check(recall(s, "u4", 10, client=redis_client), expected_topk(art, moved, 4, history, 10))


def test_recall_switches_with_the_pointer(published, redis_client):
    s, art = published
    cutoff = json.loads((art / "manifest.json").read_text())["data_cutoff_ms"]
    v2 = clone_version(art, "20240131-0000beef", cutoff + 86_400_000, row_scale=-1.0)
    publish_version(s, v2, client=redis_client)
    info = recall_with_info(s, "u4", 10, client=redis_client)
    history = [redis_keys.history_item(m) for m in redis_client.zrange(redis_keys.user_history(s.redis.prefix, "u4"), 0, -1)]
    assert info.version == v2.name
    check(info.items, expected_topk(v2, -load_model(art).user_id_embedding.weight[4].detach(), 4, history, 10))


def test_k_larger_than_what_is_left_returns_everything_unseen(published, redis_client):
    s, _ = published
    got = recall(s, "u4", 1000, client=redis_client)
    assert len(got) == 30 - 5 and len({i for i, _ in got}) == 25


@pytest.mark.parametrize(
    "user_id, k, message",
    [("u1", 0, "between 1 and 1000"), ("u1", 1001, "between 1 and 1000"), ("u1", "5", "integer"),
     ("x" * 257, 5, "at most 256"), ("", 5, "non-empty")],
)  # fmt: skip
def test_bad_requests_are_clear_errors(settings: Settings, user_id, k, message):
    with pytest.raises(ValueError, match=message):
        recall(settings, user_id, k)


def test_nothing_published_is_a_clear_error(settings: Settings, redis_client):
    with pytest.raises(NothingPublished, match="no model version is published"):
        recall(settings, "u1", 5, client=redis_client)


def test_ivf_search_widens_nprobe_when_k_exceeds_the_probed_lists():
    import faiss

    from serving.recall import search_ids
    from tests.publish_fixtures import clustered_vectors

    vectors = clustered_vectors(1682, 32, n_clusters=40, seed=3)
    index = faiss.index_factory(32, "IVF32,Flat", faiss.METRIC_INNER_PRODUCT)
    index.train(vectors)
    index.add_with_ids(vectors, np.arange(1, 1683))
    faiss.extract_index_ivf(index).nprobe = 4
    q = vectors[:1]
    _, plain = index.search(q, 1000)
    assert (plain[0] > 0).sum() < 1000  # 4 of 32 lists cannot fill k=1000
    got = search_ids(index, q, {1, 2, 3}, 1000, len(vectors))
    assert len(got) == 1000 and not {1, 2, 3} & {i for i, _ in got}
    exact = [j + 1 for j in np.argsort(-(vectors @ q[0]), kind="stable") if j + 1 not in (1, 2, 3)][:1000]
    assert [i for i, _ in got] == exact
    assert faiss.extract_index_ivf(index).nprobe == 4  # the shared index was not changed

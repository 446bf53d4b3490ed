"""The quality benchmark's pure parts (split, ItemKNN, ranking and metric wiring, verdict, report)
and one pass of every peer over a small MovieLens-100K slice derived at test time."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from benchmarks.peers.itemknn import cosine_similarity, itemknn_topk, keep_top_neighbours
from benchmarks.peers.protocol import (
    Split,
    eval_histories,
    evaluate,
    histories,
    leave_last_out,
    split_differences,
    topk_from_scores,
    topk_from_vectors,
)
from benchmarks.quality import movielens_split, prepared_split, render, run_peers, summarise, verdict


def tiny_split(events: list[tuple[int, int, int]], n_users: int, n_items: int) -> Split:
    """A Split from (user_idx, item_idx, ts) triples; ids are the indices as strings, no attributes."""
    u, i, t = (np.array(col) for col in zip(*events))
    return leave_last_out(
        u, i, t, i.astype(str), np.arange(len(u)).astype(str),
        np.zeros((n_users + 1, 1), np.int64), np.zeros((n_items + 1, 1), np.int64), 0,
    )  # fmt: skip


# --- split ----------------------------------------------------------------------------------------


def test_leave_last_out_holds_out_the_last_event_with_numeric_tie_order():
    # user 1: item 10 and item 9 at the same second, item 3 earlier -> order 3, 9, 10 -> 10 held out
    # user 2: one event only -> stays in train, no eval row
    # user 3: item 2 then item 1 -> 1 held out (time order, not id order)
    split = tiny_split([(1, 10, 50), (2, 4, 7), (1, 9, 50), (3, 1, 9), (1, 3, 5), (3, 2, 8)], n_users=3, n_items=10)
    assert split.train_users.tolist() == [1, 1, 2, 3]
    assert split.train_items.tolist() == [3, 9, 4, 2]
    assert split.eval_users.tolist() == [1, 3]
    assert split.eval_items.tolist() == [10, 1]
    assert [s.tolist() for s in split.seen] == [[3, 9], [2]]
    assert split.item_counts().tolist() == [0, 0, 1, 1, 1, 0, 0, 0, 0, 1, 0]
    assert split.user_items().shape == (4, 11)


def test_tie_order_is_numeric_for_numeric_ids_not_string_order():
    # "9" sorts after "10" as a string; the protocol puts 9 first, so 10 is the held-out item
    split = tiny_split([(1, 9, 5), (1, 10, 5)], n_users=1, n_items=10)
    assert split.eval_items.tolist() == [10]


def test_leave_last_out_refuses_indices_outside_the_tables():
    with pytest.raises(ValueError):
        tiny_split([(1, 5, 1), (1, 6, 2)], n_users=1, n_items=5)


def test_split_differences_names_what_differs():
    split = tiny_split([(1, 1, 1), (1, 2, 2), (2, 3, 1), (2, 1, 2)], n_users=2, n_items=3)
    train = (split.train_users[::-1].copy(), split.train_items[::-1].copy())  # order does not matter
    evaluation = (split.eval_users, split.eval_items)
    assert split_differences(split, train, evaluation) == []
    assert split_differences(split, train, (split.eval_users, np.array([3, 1]))) == ["eval: 1 of 2 pairs differ"]
    assert split_differences(split, (train[0][:1], train[1][:1]), evaluation) == ["train: 2 pairs here, 1 there"]


def test_histories_are_the_previous_items_oldest_first_left_aligned():
    users = np.array([1, 1, 1, 1, 2, 2])
    items = np.array([5, 6, 7, 8, 9, 4])
    assert histories(users, items, 2).tolist() == [[0, 0], [5, 0], [5, 6], [6, 7], [0, 0], [9, 0]]
    split = tiny_split([(1, 5, 1), (1, 6, 2), (1, 7, 3), (2, 9, 1), (2, 4, 2)], n_users=2, n_items=9)
    assert eval_histories(split, 3).tolist() == [[5, 6, 0], [9, 0, 0]]


def test_the_peers_split_is_the_products_spark_prepared_split(spark, settings, ml_dir, ml_small_raw_dir):
    """The benchmark's guard on a real slice: Spark prepare's train/eval pairs == leave_last_out's."""
    import datetime as dt
    import shutil

    from jobs.prepare import run_prepare

    shutil.copytree(ml_small_raw_dir, settings.paths.raw_dir)
    prepared = run_prepare(settings, dt.date(1998, 4, 22), spark)
    split = prepared_split(ml_dir, prepared, keep_user=lambda u: int(u) <= 120)  # raises on any difference
    assert len(split.eval_users) == 120
    from jobs.ingest import read_movielens_ratings

    events = sum(int(u) <= 120 for u in read_movielens_ratings(ml_dir)["user_id"].to_pylist())
    assert len(split.train_items) + len(split.eval_items) == events


# --- ItemKNN --------------------------------------------------------------------------------------


def test_cosine_similarity_and_pruning_known_values():
    # users x items: u0 {0, 1}, u1 {0, 1, 2}, u2 {2}; every item has 2 users
    x = sp.csr_matrix(np.array([[1, 1, 0], [1, 1, 1], [0, 0, 1]], dtype=np.float32))
    sim = cosine_similarity(x).toarray()
    np.testing.assert_allclose(sim, [[0, 1, 0.5], [1, 0, 0.5], [0.5, 0.5, 0]])
    pruned = keep_top_neighbours(cosine_similarity(x), 1).toarray()
    # item 2's two neighbours tie at 0.5: the smaller index is kept
    np.testing.assert_allclose(pruned, [[0, 1, 0], [1, 0, 0], [0.5, 0, 0]])


def test_itemknn_ranks_by_summed_similarity_and_excludes_seen():
    # items 1..4. Users 1, 2 co-rate 1 and 2; user 2 also rates 3; user 3 holds out item 2 after item 1.
    split = tiny_split([(1, 1, 1), (1, 2, 2), (2, 1, 1), (2, 3, 2), (2, 2, 3), (3, 1, 1), (3, 2, 2)], n_users=3, n_items=4)
    # train: u1 {1}, u2 {1, 3}, u3 {1}; eval: u1 -> 2, u2 -> 2, u3 -> 2
    # cos(1, 3) = 1 / sqrt(3 * 1); items 2 and 4 have no train users -> similarity 0
    topk = itemknn_topk(split, neighbours=0, k=3)
    assert topk[0].tolist() == [3, 2, 4]  # user 1 saw item 1: 3 scores 0.577, then 2 and 4 tie at 0 (smaller first)
    assert topk[1].tolist() == [2, 4, 0]  # user 2 saw 1 and 3: two items left, the empty slot is 0
    assert evaluate(topk, split)["hit@10"] == pytest.approx(1.0)


# --- torch-rechub inputs ---------------------------------------------------------------------------


def test_rechub_training_rows_follow_each_trainer_mode():
    from benchmarks.peers.rechub import RechubConfig, popularity_negatives, training_data

    split = tiny_split([(1, 1, 1), (1, 2, 2), (1, 3, 3), (2, 2, 1), (2, 1, 2)], n_users=2, n_items=4)
    # train: u1 [1, 2], u2 [2]; item 4 is never trained on, so it is never drawn as a negative
    negs = popularity_negatives(split.item_counts(), (2000,), np.random.default_rng(0))
    assert set(negs.tolist()) == {1, 2}
    assert abs((negs == 2).mean() - 2**0.75 / (1 + 2**0.75)) < 0.05  # p ∝ count^0.75

    x, y = training_data(split, RechubConfig(negatives=3, history_len=2), "youtubednn", np.random.default_rng(0))
    assert x["item_id"].tolist() == [1, 2, 2] and x["hist_item_id"].tolist() == [[0, 0], [1, 0], [0, 0]]
    assert tuple(x["neg_items"].shape) == (3, 3) and y.tolist() == [0, 0, 0]  # list-wise: the positive is logit 0

    x, y = training_data(split, RechubConfig(dssm_loss="inbatch"), "dssm", np.random.default_rng(0))
    assert len(y) == 3 and "neg_items" not in x

    x, y = training_data(split, RechubConfig(dssm_loss="pointwise", negatives=2, history_len=2), "dssm", np.random.default_rng(0))
    assert y.tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 0]  # each positive, then 2 sampled negatives per positive
    assert x["user_id"].tolist() == [1, 1, 2] * 3  # a negative row keeps its positive's user side
    assert set(x["item_id"][3:].tolist()) <= {1, 2}
    with pytest.raises(ValueError):
        training_data(split, RechubConfig(dssm_loss="hinge"), "dssm", np.random.default_rng(0))


# --- ranking and metric wiring --------------------------------------------------------------------


def test_vectors_and_scores_rank_the_same_way_and_seen_items_never_appear():
    split = tiny_split([(1, 1, 1), (1, 3, 2), (2, 2, 1), (2, 1, 2)], n_users=2, n_items=4)
    # eval: user 1 -> item 3 (seen {1}), user 2 -> item 1 (seen {2})
    item_vecs = np.array([[0, 0], [1, 0], [0.9, 0.1], [0.5, 0.5], [0, 1]], dtype=np.float32)
    user_vecs = np.array([[1, 0], [0, 1]], dtype=np.float32)
    by_vectors = topk_from_vectors(user_vecs, item_vecs, split, k=3)
    assert by_vectors.tolist() == [[2, 3, 4], [4, 3, 1]]  # the seen item (1, resp. 2) is skipped
    by_scores = topk_from_scores(lambda s, e: user_vecs[s:e] @ item_vecs[1:].T, split, k=3)
    assert by_scores.tolist() == by_vectors.tolist()
    m = evaluate(by_vectors, split)
    assert m["hit@10"] == 1.0
    assert m["ndcg@10"] == pytest.approx((1 / np.log2(3) + 1 / np.log2(4)) / 2)
    with pytest.raises(ValueError):
        topk_from_vectors(user_vecs, item_vecs[:4], split)


# --- summary and report ---------------------------------------------------------------------------


def _model(name: str, kind: str, hit50s: list[float]) -> dict:
    runs = [{"seed": s, "hit@10": h / 3, "hit@50": h, "hit@100": min(1.0, h * 1.5), "ndcg@10": h / 6} for s, h in enumerate(hit50s)]
    return summarise({"name": name, "kind": kind, "label": name, "runs": runs})


def test_verdict_compares_means_of_the_best_of_each_side():
    models = [
        _model("als", "peer", [0.30, 0.34]),
        _model("knn", "peer", [0.25]),
        _model("ours-a", "ours", [0.44, 0.46]),
        _model("ours-b", "ours", [0.40]),
    ]
    assert models[0]["stats"]["hit@50"] == {"mean": 0.32, "min": 0.30, "max": 0.34}
    v = verdict(models)
    assert (v["best_peer"], v["our_best"], v["ratio"], v["goal_met"]) == ("als", "ours-a", round(0.45 / 0.32, 3), True)
    assert v["ratio_worst_seed_vs_best_seed"] == round(0.44 / 0.34, 3)
    assert verdict(models[:2] + [_model("ours-c", "ours", [0.35])])["goal_met"] is False


def test_forced_pq_row_says_why_the_product_does_not_serve_it():
    from benchmarks.quality import _pq_verdict

    runs = [{"reaches_target": False, "target_recall": 0.95}, {"reaches_target": True, "target_recall": 0.95}]
    assert _pq_verdict(runs, {"type": "IVF-Flat"}) == "below the 0.95 recall target, so the product serves IVF-Flat instead"
    assert _pq_verdict(runs[1:], {"type": "IVF-Flat"}) == "reaches the 0.95 recall target"


def test_a_model_that_failed_is_rendered_with_its_reason():
    failed = summarise({"name": "x", "kind": "peer", "label": "torch-rechub X", "runs": [{"seed": 1, "error": "ImportError: no module"}]})
    ok = [_model("als", "peer", [0.3]), _model("ours", "ours", [0.45, 0.47])]
    result = {
        "machine": {"cpus": 2}, "command": "python -m benchmarks.quality", "measured_at": "now",
        "protocol": "p", "split": {"train_interactions": 10, "eval_users": 2, "items": 5},
        "seeds": {"ours_and_rechub": [42], "implicit": [42]},
        "models": [failed, *ok], "verdict": verdict([failed, *ok]), "index": {}, "protocol_check": {"same": True},
    }  # fmt: skip
    text = "\n".join(render(result))
    assert "| torch-rechub X | 0 | not measured: ImportError: no module |" in text
    assert "| ours | 2 | 0.153 (0.150–0.157) | 0.460 (0.450–0.470) |" in text
    assert "Ratio **1.533** against the goal 1.3: it meets the goal (our worst seed against the peer's best seed: 1.500)." in text


# --- every peer on a small MovieLens slice ---------------------------------------------------------


@pytest.fixture(scope="module")
def ml_small_split(ml_dir) -> Split:
    """Users 1..40 of MovieLens-100K with every item of the corpus; idx = the numeric id."""
    from jobs.ingest import movielens_item_attrs, movielens_user_attrs

    users = dict(movielens_user_attrs(x) for x in (ml_dir / "u.user").read_text(encoding="latin-1").splitlines() if x)
    items = dict(movielens_item_attrs(x) for x in (ml_dir / "u.item").read_text(encoding="latin-1").splitlines() if x)
    tokens = {t: j + 1 for j, t in enumerate(sorted({t for a in [*users.values(), *items.values()] for t in a}))}

    def table(attrs: dict[str, list[str]]) -> np.ndarray:
        out = np.zeros((max(int(k) for k in attrs) + 1, max(len(a) for a in attrs.values())), np.int64)
        for key, a in attrs.items():
            out[int(key), : len(a)] = [tokens[t] for t in a]
        return out

    ids = lambda keys: {k: int(k) for k in keys}  # noqa: E731
    return movielens_split(ml_dir, ids(users), ids(items), table(users), table(items), len(tokens), keep_user=lambda u: int(u) <= 40)


def test_every_peer_runs_on_a_small_movielens_slice(ml_small_split):
    from benchmarks.peers.rechub import RechubConfig

    split = ml_small_split
    assert len(split.eval_users) == 40 and split.n_items == 1682
    models = {m["name"]: summarise(m) for m in run_peers(split, [1], [1], threads=1, rechub_cfg=RechubConfig(epochs=1, batch_size=256, negatives=5))}
    assert sorted(models) == ["implicit-als", "implicit-bpr", "itemknn", "popularity", "rechub-dssm", "rechub-youtubednn"]
    for name, m in models.items():
        assert "error" not in m, f"{name}: {m.get('error')}"
        assert all(0.0 <= m["stats"][k]["mean"] <= 1.0 for k in ("hit@10", "hit@50", "hit@100", "ndcg@10")), name
        assert m["stats"]["hit@10"]["mean"] <= m["stats"]["hit@50"]["mean"] <= m["stats"]["hit@100"]["mean"], name
    # ALS learns something on 40 users: better than chance (100 / 1,682 items per user at @100)
    assert models["implicit-als"]["stats"]["hit@100"]["mean"] > 0.1


# --- training throughput --------------------------------------------------------------------------


def test_train_throughput_feeds_both_trainers_the_same_synthetic_samples():
    from benchmarks.train_throughput import ours_samples_per_s, rechub_samples_per_s, render as render_throughput, synthetic_split

    split = synthetic_split(n_events=3000, n_users=100, n_items=100, seed=3)
    assert len(split.train_items) + len(split.eval_items) == 3000
    assert split.train_users.min() >= 1 and split.train_items.max() <= 100 and split.n_attrs > 0
    ours = ours_samples_per_s(split, threads=1, epochs=1, seed=1)
    peer = rechub_samples_per_s(split, threads=1, epochs=1, seed=1)
    assert ours["samples"] == len(split.train_items)
    assert peer["samples"] == len(split.train_items) // 1024 * 1024  # in-batch negatives drop the last partial batch
    assert ours["samples_per_s"] > 0 and peer["samples_per_s"] > 0
    result = {
        "machine": {"cpus": 2}, "command": "c", "measured_at": "t", "batch_size": 1024, "dim": 64, "epochs": 1,
        "data": {"source": "s", "seed": 3, "events": 3000, "train_samples": len(split.train_items), "history_len": 50},
        "rows": [{"trainer": "ours", **ours}, {"trainer": "torch-rechub DSSM", **peer}],
        "ours_over_rechub_by_threads": {"1": 1.5},
    }  # fmt: skip
    text = "\n".join(render_throughput(result))
    assert f"| 1 | {ours['samples']:,} |" in text and "1 thread(s): 1.5" in text

"""Quality against peers on MovieLens-100K under the DESIGN §9 protocol, all in one run.

    python -m benchmarks.quality [--seeds 1] [--peer-seeds 3] [--threads 1]

One split for everyone: MovieLens-100K is ingested and prepared by the product's own stages
(jobs.ingest, Spark prepare through jobs.nightly), exactly as ``make quality`` does. The peers'
split is rebuilt from the same events by benchmarks.peers.protocol.leave_last_out and checked
pair for pair against the prepared train/eval split before anything is trained (a mismatch stops
the run). Every model then ranks all 1,682 items for the 943 held-out users, with the user's
train items excluded, through models.ranking, and is scored by jobs.evaluate.metrics_from_topk.

    peers  popularity (jobs.baselines), ItemKNN (cosine; neighbourhood sizes swept, best kept),
           implicit ALS (f32, reg 0.1, α 10, 20 it), implicit BPR (f128, 200 it),
           torch-rechub DSSM and YoutubeDNN (the library's models and MatchTrainer)
    ours   each architecture of models.towers.ARCHS trained by the nightly train stage, scored
           (1) by exact search (the evaluate stage), (2) through the index the product builds
           (the index stage; on 1,682 items it falls back from PQ, index.json says why) and
           (3) through a forced IVF-PQ index with the widest PQ code 1,682 points can train

Reported: hit@10/50/100 and NDCG@10 per model (mean and range over seeds), the best peer, our
best, and our_best_hit50 / best_peer_hit50 against the goal 1.3. Writes
benchmarks/out/quality.json. A benchmark reports; it never fails on the numbers.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import numpy as np

from benchmarks.peers.protocol import Split, evaluate, leave_last_out, split_differences
from benchmarks.peers.report import header, load_line, run_facts

log = logging.getLogger("benchmarks.quality")
OUT = Path(__file__).resolve().parent / "out"
GOAL_RATIO = 1.3
"""Issue 6: our best hit@50 at least 30% above the best peer's."""
KNN_NEIGHBOURS = (10, 20, 50, 100, 0)
"""ItemKNN neighbourhood sizes tried (0 = every co-rated item); the best hit@50 is the peer's row."""
METRICS = ("hit@10", "hit@50", "hit@100", "ndcg@10")


# --- the shared split -----------------------------------------------------------------------------


def movielens_split(
    ml_dir: Path,
    user_index: dict[str, int],
    item_index: dict[str, int],
    user_attrs: np.ndarray,
    item_attrs: np.ndarray,
    n_attrs: int,
    keep_user: Callable[[str], bool] | None = None,
) -> Split:
    """MovieLens ratings (read by the product's ingest reader) -> the DESIGN §9 Split.

    ``user_index``/``item_index`` map raw ids to vocabulary idx (the prepared partition's, so
    peers and ours share indices); ``keep_user`` optionally keeps a subset of users (tests).
    """
    from jobs.ingest import read_movielens_ratings

    table = read_movielens_ratings(Path(ml_dir))
    users = np.asarray(table["user_id"].to_pylist())
    items = np.asarray(table["item_id"].to_pylist())
    keep = np.array([keep_user(u) for u in users]) if keep_user else np.ones(len(users), bool)
    return leave_last_out(
        np.array([user_index[u] for u in users[keep]], dtype=np.int64),
        np.array([item_index[i] for i in items[keep]], dtype=np.int64),
        table["ts"].to_numpy()[keep],
        items[keep],
        np.asarray(table["event_id"].to_pylist())[keep],
        user_attrs,
        item_attrs,
        n_attrs,
    )


def prepared_split(ml_dir: Path, prepared_dir: Path, keep_user: Callable[[str], bool] | None = None) -> Split:
    """The Split in the prepared partition's vocabularies; raises when it is not, pair for pair,
    the product's own train/eval split (so peers and ours see identical data). ``keep_user``:
    the users the partition was prepared from, when that was a slice of MovieLens (tests)."""
    import pyarrow.parquet as pq

    from models.data import read_manifest, read_pairs
    from models.features import load_feature_tables

    manifest = read_manifest(prepared_dir)
    vocab = {}
    for kind in ("users", "items"):
        table = pq.read_table(prepared_dir / f"vocab_{kind}.parquet")
        vocab[kind] = dict(zip(table[f"{kind[:-1]}_id"].to_pylist(), table["idx"].to_pylist()))
    features = load_feature_tables(prepared_dir, manifest["n_users"], manifest["n_items"])
    split = movielens_split(
        ml_dir, vocab["users"], vocab["items"], features.user_attrs.numpy(), features.item_attrs.numpy(), manifest["n_attrs"], keep_user
    )
    diffs = split_differences(split, read_pairs(prepared_dir, "train"), read_pairs(prepared_dir, "eval"))
    if diffs:
        raise RuntimeError(f"the peers' split is not the product's prepared split: {'; '.join(diffs)}")
    return split


# --- peers ----------------------------------------------------------------------------------------


def _metrics(m: dict[str, float]) -> dict[str, float]:
    return {k: round(float(m[k]), 4) for k in METRICS}


def _attempt(name: str, fn: Callable[[], tuple[dict, dict]]) -> dict[str, Any]:
    """One run of one model: its metrics and details, or the error that stopped it."""
    t0 = time.perf_counter()
    try:
        metrics, info = fn()
    except Exception as exc:  # a peer that cannot run is reported, not fatal
        log.exception("%s could not run", name)
        return {"error": f"{type(exc).__name__}: {exc}", "seconds": round(time.perf_counter() - t0, 1)}
    log.info("%s: hit@10 %.3f, hit@50 %.3f, hit@100 %.3f, ndcg@10 %.3f", name, *(metrics[k] for k in METRICS))
    return {**_metrics(metrics), **info, "seconds": round(time.perf_counter() - t0, 1)}


def run_peers(split: Split, peer_seeds: list[int], deep_seeds: list[int], threads: int, rechub_cfg=None) -> list[dict]:
    """Every peer on ``split``; one entry per model with its runs (one per seed)."""
    from threadpoolctl import threadpool_limits

    from benchmarks.peers import implicit_mf, itemknn, rechub
    from jobs.baselines import popularity_topk

    rechub_cfg = rechub_cfg or rechub.RechubConfig()
    models = []
    pop = _attempt("popularity", lambda: (evaluate(popularity_topk(split.item_counts(), split.seen, 100), split), {}))
    models.append({"name": "popularity", "kind": "peer", "label": "popularity (train counts)", "runs": [{"seed": None, **pop}]})

    sweep = [_attempt(f"ItemKNN k={k}", lambda k=k: (evaluate(itemknn.itemknn_topk(split, k), split), {"neighbours": k})) for k in KNN_NEIGHBOURS]
    ok = [r for r in sweep if "error" not in r]
    best = max(ok, key=lambda r: r["hit@50"]) if ok else sweep[0]
    models.append({
        "name": "itemknn", "kind": "peer", "runs": [{"seed": None, **best}], "sweep": sweep,
        "label": f"ItemKNN (cosine, {best.get('neighbours') or 'all'} neighbours: best hit@50 of k in {list(KNN_NEIGHBOURS)}, 0 = all)",
    })  # fmt: skip

    with threadpool_limits(1, "blas"):  # implicit's own threads do the work; BLAS threads only contend
        als = [_attempt(f"ALS seed {s}", lambda s=s: _unpack(implicit_mf.als_topk(split, implicit_mf.AlsConfig(), s, threads), split)) for s in peer_seeds]
        bpr = [_attempt(f"BPR seed {s}", lambda s=s: _unpack(implicit_mf.bpr_topk(split, implicit_mf.BprConfig(), s, threads), split)) for s in peer_seeds]
    models.append({"name": "implicit-als", "kind": "peer", "label": "implicit ALS (f32, reg 0.1, α 10, 20 it)", "runs": _seeded(als, peer_seeds)})
    models.append({"name": "implicit-bpr", "kind": "peer", "label": "implicit BPR (f128, 200 it)", "runs": _seeded(bpr, peer_seeds)})

    for arch, label in (("dssm", "torch-rechub DSSM"), ("youtubednn", "torch-rechub YoutubeDNN")):
        runs = [
            _attempt(f"{label} seed {s}", lambda s=s: _unpack(rechub.rechub_topk(split, rechub_cfg, arch, s, threads), split))
            for s in deep_seeds
        ]
        models.append({"name": f"rechub-{arch}", "kind": "peer", "label": f"{label} 0.9.0 ({_rechub_recipe(arch, rechub_cfg)})", "runs": _seeded(runs, deep_seeds)})
    return models


def _unpack(result: tuple[np.ndarray, dict], split: Split) -> tuple[dict, dict]:
    topk, info = result
    return evaluate(topk, split), info


def _seeded(runs: list[dict], seeds: list[int]) -> list[dict]:
    return [{"seed": s, **r} for s, r in zip(seeds, runs)]


def _rechub_recipe(arch: str, cfg) -> str:
    if arch == "dssm":
        loss = "in-batch negatives" if cfg.dssm_loss == "inbatch" else f"point-wise BCE, {cfg.negatives} sampled negatives"
        return f"dim {cfg.dim}, towers 256-128-{cfg.dim}, {loss}, {cfg.epochs} epochs"
    return f"dim {cfg.dim}, user tower 256-{cfg.dim}, softmax over {cfg.negatives} popularity-sampled negatives, τ {cfg.temperature}, {cfg.epochs} epochs"


# --- ours -----------------------------------------------------------------------------------------


def forced_pq_metrics(artifact_dir: Path, prepared_dir: Path, target_recall: float, seed: int) -> dict[str, Any]:
    """Our model through an IVF-PQ index with the widest PQ code the corpus can train.

    The product rejects this index on MovieLens (its recall@100 stays below the target; it
    serves IVF-Flat instead); this row exists so "through the IVF-PQ index" is measured too.
    nprobe is tuned exactly as the product tunes it (jobs.index.tune_nprobe).
    """
    import faiss

    from jobs.evaluate import eval_queries, metrics_from_topk
    from jobs.index import RECALL_K, ann_topk, exact_topk, load_item_vectors, tune_nprobe
    from jobs.index_params import MIN_PQ_NBITS, IndexPlan, nlist_for, pq_m_for, small_pq_nbits

    vectors, ids = load_item_vectors(artifact_dir)
    n, d = vectors.shape
    plan = IndexPlan("IVF-PQ", nlist=nlist_for(n), m=pq_m_for(d), nbits=small_pq_nbits(n) or MIN_PQ_NBITS)
    index = faiss.index_factory(d, plan.factory, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    ivf.cp.seed = seed
    ivf.pq.cp.seed = seed
    ivf.do_polysemous_training = False
    index.train(vectors)
    index.add_with_ids(vectors, ids)
    user_vecs, targets, seen = eval_queries(artifact_dir, prepared_dir)
    queries = np.ascontiguousarray(user_vecs, dtype=np.float32)
    nprobe, recall, trace = tune_nprobe(index, plan, queries, exact_topk(vectors, ids, queries, RECALL_K), target_recall)
    metrics = metrics_from_topk(ann_topk(index, queries, seen, RECALL_K, n), targets)
    return {**_metrics(metrics), "factory": plan.factory, "nprobe": nprobe, "ann_recall_at_100": round(recall, 4),
            "target_recall": target_recall, "reaches_target": recall >= target_recall, "tuning": trace}  # fmt: skip


def run_ours(settings, day: dt.date, prepared_dir: Path, seeds: list[int]) -> tuple[list[dict], list[dict], dict]:
    """Each architecture x seed through the product's train, evaluate and index stages.

    Returns (model entries, the product's popularity rows from its evaluate stage, index facts).
    """
    from jobs.nightly import stage_evaluate, stage_index, stage_train
    from models.towers import ARCHS

    entries, product_popularity, index_facts = [], [], {}
    for arch in ARCHS:
        exact, used, forced = [], [], []
        for seed in seeds:
            s = settings.replace("model", arch=arch).replace("train", seed=seed)
            t0 = time.perf_counter()
            artifact = stage_train(s, day)
            train_s = time.perf_counter() - t0
            metrics = stage_evaluate(s, artifact, day)
            product_popularity.append(metrics["baselines"]["popularity"])
            exact.append({"seed": seed, **_metrics(metrics["exact"]), "version": artifact.name, "seconds": round(train_s, 1)})
            log.info("ours %s seed %d exact: %s", arch, seed, exact[-1])
            t0 = time.perf_counter()
            meta = stage_index(s, artifact, day)
            used.append({"seed": seed, **_metrics(meta["ann"]), "factory": meta["factory"], "nprobe": meta["nprobe"],
                         "ann_recall_at_100": meta["ann_recall_at_100"], "seconds": round(time.perf_counter() - t0, 1)})  # fmt: skip
            index_facts.setdefault(arch, {"type": meta["type"], "factory": meta["factory"], "fallback": meta["fallback"]})
            t0 = time.perf_counter()
            forced.append({"seed": seed, **forced_pq_metrics(artifact, prepared_dir, s.index.target_recall, s.index.seed),
                           "seconds": round(time.perf_counter() - t0, 1)})  # fmt: skip
        facts = index_facts[arch]
        per_seed = lambda runs, key: "/".join(str(r[key]) for r in runs)  # noqa: E731
        entries += [
            {"name": f"ours-{arch}-exact", "kind": "ours", "label": f"ours, {arch}, exact search", "runs": exact},
            {"name": f"ours-{arch}-index", "kind": "ours", "runs": used,
             "label": f"ours, {arch}, through the index the product builds ({facts['type']} {facts['factory']}, "
                      f"nprobe {per_seed(used, 'nprobe')}, recall@100 {per_seed(used, 'ann_recall_at_100')})"},
            {"name": f"ours-{arch}-ivfpq", "kind": "ours", "runs": forced,
             "label": f"ours, {arch}, through a forced IVF-PQ index ({forced[0]['factory']}, nprobe {per_seed(forced, 'nprobe')}, "
                      f"recall@100 {per_seed(forced, 'ann_recall_at_100')}: {_pq_verdict(forced, facts)})"},
        ]  # fmt: skip
    return entries, product_popularity, index_facts


def _pq_verdict(forced: list[dict], facts: dict) -> str:
    """Why the forced IVF-PQ row is not what the product serves (or that it could be)."""
    if all(r["reaches_target"] for r in forced):
        return f"reaches the {forced[0]['target_recall']} recall target"
    return f"below the {forced[0]['target_recall']} recall target, so the product serves {facts['type']} instead"


# --- summary --------------------------------------------------------------------------------------


def summarise(model: dict) -> dict:
    """Mean, min and max of each metric over the model's successful runs (pure)."""
    ok = [r for r in model["runs"] if "error" not in r]
    if not ok:
        return {**model, "error": "; ".join(sorted({r["error"] for r in model["runs"]}))}
    stats = {k: {"mean": round(float(np.mean([r[k] for r in ok])), 4), "min": min(r[k] for r in ok), "max": max(r[k] for r in ok)} for k in METRICS}
    return {**model, "n_runs": len(ok), "stats": stats}


def verdict(models: list[dict]) -> dict:
    """Best peer, our best (by mean hit@50) and their ratio against GOAL_RATIO (pure)."""

    def best(kind: str) -> dict | None:
        ok = [m for m in models if m["kind"] == kind and "stats" in m]
        return max(ok, key=lambda m: m["stats"]["hit@50"]["mean"]) if ok else None

    peer, ours = best("peer"), best("ours")
    if not peer or not ours:
        return {"best_peer": peer and peer["name"], "our_best": ours and ours["name"], "ratio": None, "goal": GOAL_RATIO, "goal_met": None}
    p, o = peer["stats"]["hit@50"]["mean"], ours["stats"]["hit@50"]["mean"]
    ratio = round(o / p, 3) if p else None
    # the same two models, our worst seed against the peer's best seed
    worst_case = round(ours["stats"]["hit@50"]["min"] / peer["stats"]["hit@50"]["max"], 3) if p else None
    return {"best_peer": peer["name"], "best_peer_hit50": p, "our_best": ours["name"], "our_best_hit50": o,
            "ratio": ratio, "ratio_worst_seed_vs_best_seed": worst_case, "goal": GOAL_RATIO,
            "goal_met": bool(ratio is not None and ratio >= GOAL_RATIO)}  # fmt: skip


def run(
    seeds: int = 1,
    peer_seeds: int = 3,
    threads: int = 1,
    epochs: int | None = None,
    ml_dir: Path | None = None,
    keep_state: bool = False,
) -> dict[str, Any]:
    """The whole comparison; returns the JSON-ready result. ``epochs`` overrides the training
    epochs of ours and of the torch-rechub peers alike (default: the product's, 12)."""
    from benchmarks.peers.rechub import RechubConfig
    from jobs.ingest import ingest_movielens
    from jobs.main import default_logical_date
    from jobs.nightly import stage_prepare
    from twotower.config import load_settings

    started = time.perf_counter()
    settings = load_settings()
    ml_dir = Path(ml_dir or settings.paths.movielens_dir)
    if not (ml_dir / "u.data").exists():
        raise FileNotFoundError(f"the quality benchmark needs MovieLens-100K at {ml_dir}")
    tag = uuid.uuid4().hex[:8]
    state = OUT / f"state-quality-{tag}"
    settings = settings.replace("paths", state_dir=state).replace("redis", prefix=f"tt-bench-quality-{tag}").replace("train", threads=threads)
    if epochs:
        settings = settings.replace("train", epochs=epochs)
    rechub_cfg = RechubConfig(epochs=settings.train.epochs, batch_size=settings.train.batch_size, dim=settings.model.dim)
    deep = list(range(settings.train.seed, settings.train.seed + seeds))
    cheap = list(range(settings.train.seed, settings.train.seed + max(peer_seeds, seeds)))
    timings: dict[str, float] = {}
    try:
        t0 = time.perf_counter()
        day = default_logical_date(ingest_movielens(ml_dir, settings.paths.raw_dir).days, 0)
        prepared = stage_prepare(settings, day)
        split = prepared_split(ml_dir, prepared)
        timings["ingest_prepare_split"] = round(time.perf_counter() - t0, 1)
        log.info("split: %d train interactions, %d held-out users, %d items; identical to the prepared split",
                 len(split.train_items), len(split.eval_items), split.n_items)  # fmt: skip
        t0 = time.perf_counter()
        peers = run_peers(split, cheap, deep, threads, rechub_cfg)
        timings["peers"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        ours, product_popularity, index_facts = run_ours(settings, day, prepared, deep)
        timings["ours"] = round(time.perf_counter() - t0, 1)
    finally:
        if not keep_state:
            shutil.rmtree(state, ignore_errors=True)
    models = [summarise(m) for m in peers + ours]
    pop = _metrics(product_popularity[0]) if product_popularity else None
    peer_pop = next(m for m in models if m["name"] == "popularity")["runs"][0]
    timings["total"] = round(time.perf_counter() - started, 1)
    return {
        **run_facts("quality"),
        "protocol": "MovieLens-100K, each user's last interaction held out (same-second ties by item id, numerically), "
                    "every interaction a positive, full ranking of all items, the user's train items excluded",
        "split": {"train_interactions": int(len(split.train_items)), "eval_users": int(len(split.eval_items)),
                  "items": split.n_items, "identical_to_prepared_split": True, "logical_date": day.isoformat()},
        "protocol_check": {"product_popularity": pop, "benchmark_popularity": {k: peer_pop.get(k) for k in METRICS},
                           "same": pop == {k: peer_pop.get(k) for k in METRICS}},
        "seeds": {"ours_and_rechub": deep, "implicit": cheap},
        "torch_threads": threads,
        "index": index_facts,
        "models": models,
        "verdict": verdict(models),
        "seconds": timings,
        "versions": _versions(),
    }  # fmt: skip


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {p: version(p) for p in ("torch", "implicit", "torch-rechub", "faiss-cpu", "numpy", "scipy") if _installed(p)}


def _installed(package: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version(package)
        return True
    except PackageNotFoundError:
        return False


# --- report ---------------------------------------------------------------------------------------


def _cell(model: dict, key: str) -> str:
    s = model["stats"][key]
    if model["n_runs"] == 1 or s["min"] == s["max"]:
        return f"{s['mean']:.3f}"
    return f"{s['mean']:.3f} ({s['min']:.3f}–{s['max']:.3f})"


def render(result: dict) -> list[str]:
    """Markdown lines of the quality section of RESULTS.md (pure)."""
    v = result["verdict"]
    lines = header("Quality against peers (MovieLens-100K, DESIGN §9 protocol)", result) + [
        f"Protocol: {result['protocol']}. Split: {result['split']['train_interactions']:,} train interactions, "
        f"{result['split']['eval_users']} held-out users, {result['split']['items']:,} items; every model saw this one split "
        "(checked pair for pair against the product's Spark-prepared split). "
        f"Seeds: ours and torch-rechub {result['seeds']['ours_and_rechub']}, implicit {result['seeds']['implicit']}; "
        "with several seeds a cell shows the mean and (min–max).",
        "",
        "| model | runs | hit@10 | hit@50 | hit@100 | NDCG@10 |",
        "|---|---|---|---|---|---|",
    ]
    for m in result["models"]:
        if "stats" in m:
            lines.append(f"| {m['label']} | {m['n_runs']} | " + " | ".join(_cell(m, k) for k in METRICS) + " |")
        else:
            lines.append(f"| {m['label']} | 0 | not measured: {m['error']} | | | |")
    lines.append("")
    if v["ratio"] is None:
        lines.append("The ratio could not be computed: a side has no successful run.")
    else:
        met = "meets" if v["goal_met"] else "**does not meet**"
        lines.append(
            f"Best peer: {v['best_peer']} (hit@50 {v['best_peer_hit50']:.3f}). Our best: {v['our_best']} "
            f"(hit@50 {v['our_best_hit50']:.3f}). Ratio **{v['ratio']:.3f}** against the goal {v['goal']}: it {met} the goal "
            f"(our worst seed against the peer's best seed: {v['ratio_worst_seed_vs_best_seed']:.3f})."
        )
    for arch, facts in result.get("index", {}).items():
        lines.append("")
        lines.append(f"Index the product built for {arch}: {facts['factory']} ({facts['type']}). Why: {facts['fallback'] or 'preferred structure'}.")
    pc = result.get("protocol_check", {})
    lines += ["", f"Protocol check: the product's evaluate stage and this benchmark give the same popularity row: {pc.get('same')}."]
    return lines + load_line(result) + [""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=1, help="seeds for ours and the torch-rechub peers")
    parser.add_argument("--peer-seeds", type=int, default=3, help="seeds for implicit ALS and BPR (cheap)")
    parser.add_argument("--threads", type=int, default=1, help="torch / implicit threads (0 = every core)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs of ours and torch-rechub (default 12)")
    parser.add_argument("--keep-state", action="store_true", help="keep the benchmark's state dir under benchmarks/out")
    args = parser.parse_args(argv)
    from twotower.logs import setup_logging

    setup_logging()
    threads = args.threads or (os.cpu_count() or 1)
    result = run(args.seeds, args.peer_seeds, threads, args.epochs, keep_state=args.keep_state)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "quality.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    print("\n".join(render(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

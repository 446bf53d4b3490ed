"""Faiss index over the item vectors of one model version (DESIGN §6).

    item_embeddings.npy rows 1..n_items (unit norm, ids = item_idx)
        -> candidates from jobs.index_params (IVF-PQ first; honest fallbacks for tiny corpora)
        -> train (on a seeded sample of nlist x ``index.train_points_per_list`` vectors) + add
           on the GPU when Faiss sees one (index_cpu_to_gpu), else on the CPU;
           the index is moved back with index_gpu_to_cpu before anything else happens
        -> nprobe raised until ANN recall@100 against exact inner-product search reaches
           ``index.target_recall`` on sampled queries (on the CPU index serving loads, so the
           stored recall is the served recall)
        -> index.faiss + index.json written atomically; "ann" offline metrics merged into
           metrics.json (same protocol as the exact metrics, seen items excluded).

Queries: when a prepared partition is given, ``index.eval_queries`` user vectors sampled from
the evaluation split (jobs.evaluate.eval_queries) — the real query distribution. Without one
(vector-only builds, tests), item vectors plus Gaussian noise of norm ~0.5, re-normalised.
index.json says which were used.

Inner product on unit vectors ranks exactly as L2 does; it is used so that the search scores are
the model's cosine scores.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from jobs.index_params import GPU_MAX_K, MIN_POINTS_PER_CENTROID, IndexPlan, choose_device, nprobe_schedule, plan_candidates, search_k
from twotower.config import IndexConfig, Settings
from twotower.contracts import ARTIFACT_FILES

log = logging.getLogger(__name__)

RECALL_K = 100
"""Recall is measured as overlap of the top-100 ANN and exact neighbours."""
QUERY_NOISE_NORM = 0.5
"""Expected norm of the noise added to item vectors when no user queries are available."""
RECALL_PLATEAU = 0.002
"""PQ tuning stops below the target when one step of the nprobe schedule gains less recall@100
than this: the codes, not the probing, limit recall then, and every further step only slows
search (1M synthetic items: 0.908 at nprobe 192 of 4096, 0.9095 at 2048, which is 10x slower)."""


class IndexQualityError(RuntimeError):
    """The best index reachable is below ``index.recall_floor``; nothing was written."""


@dataclass(frozen=True)
class BuiltIndex:
    """A trained, filled, tuned CPU index and what was measured about it."""

    index: Any  # faiss.Index (CPU)
    plan: IndexPlan
    nprobe: int
    recall: float
    device: str
    tuning: list[tuple[int, float]]  # (nprobe, recall@100) in the order tried


# --- exact neighbours and recall -------------------------------------------------------------


def exact_topk(vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact inner-product top-``k`` ids ``[Q, k]`` (brute force through faiss.IndexFlatIP)."""
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(vectors)
    _, pos = flat.search(queries, min(k, len(vectors)))
    return ids[pos]


def recall_at_k(ann_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean over queries of |ANN top-k ∩ exact top-k| / k (``-1`` ANN slots never match)."""
    k = exact_ids.shape[1]
    hits = sum(len(np.intersect1d(a[a >= 0], e, assume_unique=False)) for a, e in zip(ann_ids, exact_ids))
    return hits / (k * len(exact_ids))


def set_nprobe(index: Any, nprobe: int) -> None:
    """Set nprobe on a CPU index (no-op for exact Flat)."""
    if nprobe > 0:
        faiss.ParameterSpace().set_index_parameter(index, "nprobe", nprobe)


# --- build --------------------------------------------------------------------------------------


def training_size(n: int, plan: IndexPlan, cfg: IndexConfig) -> int:
    """How many of the ``n`` vectors the index trains on: ``nlist x index.train_points_per_list``
    (every vector when that is more, when the setting is 0, and for Flat).

    The per-list count is raised to MIN_POINTS_PER_CENTROID (k-means quality) and the sample to
    the PQ codebook need (2^nbits x MIN_POINTS_PER_CENTROID), so a sample never starves either.
    """
    per_list = cfg.train_points_per_list
    if per_list <= 0 or not plan.is_ivf:
        return n
    size = plan.nlist * max(per_list, MIN_POINTS_PER_CENTROID)
    if plan.type == "IVF-PQ":
        size = max(size, (1 << plan.nbits) * MIN_POINTS_PER_CENTROID)
    return min(n, size)


def training_rows(n: int, plan: IndexPlan, cfg: IndexConfig) -> np.ndarray | slice:
    """Rows the index trains on: all (a slice) or a sorted sample of ``training_size`` drawn with
    ``index.seed`` (the same rows in every run, so builds stay deterministic)."""
    size = training_size(n, plan, cfg)
    if size >= n:
        return slice(None)
    return np.sort(np.random.default_rng(cfg.seed).choice(n, size=size, replace=False))


def _train_and_add(plan: IndexPlan, vectors: np.ndarray, ids: np.ndarray, cfg: IndexConfig) -> tuple[Any, str]:
    """A filled CPU index of ``plan`` and the device it was trained on (one path, placement aside)."""
    d = vectors.shape[1]
    index = faiss.index_factory(d, plan.factory, faiss.METRIC_INNER_PRODUCT)
    if plan.is_ivf:
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.seed = cfg.seed
        if plan.type == "IVF-PQ":
            ivfpq = faiss.downcast_index(ivf)
            ivfpq.pq.cp.seed = cfg.seed
            # the factory turns on polysemous training (Hamming-filter codes we never search with):
            # it is most of the training time and changes nothing about recall
            ivfpq.do_polysemous_training = False
    device = choose_device(cfg.use_gpu, faiss.get_num_gpus(), plan)
    train = vectors[training_rows(len(vectors), plan, cfg)]
    if len(train) < len(vectors):
        log.info("index: training %s on a sample of %d of %d vectors (index.train_points_per_list=%d)",
                 plan.factory, len(train), len(vectors), cfg.train_points_per_list)  # fmt: skip
    if device == "gpu":
        resources = faiss.StandardGpuResources()
        options = faiss.GpuClonerOptions()
        options.useFloat16 = plan.m > 48  # large M needs half-precision lookup tables to fit shared memory
        work = faiss.index_cpu_to_gpu(resources, 0, index, options)
    else:
        work = index
    work.train(train)
    work.add_with_ids(vectors, ids)
    if device == "gpu":
        index = faiss.index_gpu_to_cpu(work)
    return index, device


def tune_nprobe(
    index: Any, plan: IndexPlan, queries: np.ndarray, exact_ids: np.ndarray, target: float
) -> tuple[int, float, list[tuple[int, float]]]:
    """Smallest nprobe on the schedule whose recall@k reaches ``target`` (or the largest tried).

    For IVF-PQ, raising nprobe also stops below the target once a step gains less than
    RECALL_PLATEAU (the recall the codes allow is reached; IVF-Flat always probes on, since
    probing every list is exact). Returns (nprobe, recall, [(nprobe, recall), ...]); Flat
    indexes return (0, recall, ...).
    """
    k = exact_ids.shape[1]
    if not plan.is_ivf:
        _, got = index.search(queries, k)
        r = recall_at_k(got, exact_ids)
        return 0, r, [(0, r)]
    trace: list[tuple[int, float]] = []
    for nprobe in nprobe_schedule(plan.nlist, GPU_MAX_K):
        set_nprobe(index, nprobe)
        _, got = index.search(queries, k)
        r = recall_at_k(got, exact_ids)
        trace.append((nprobe, r))
        log.info("index %s: nprobe=%d of %d lists gives recall@%d %.4f", plan.factory, nprobe, plan.nlist, k, r)
        if r >= target:
            break
        if plan.type == "IVF-PQ" and len(trace) > 1 and r - trace[-2][1] < RECALL_PLATEAU:
            log.info("index %s: recall@%d has levelled off at %.4f below the target %.2f; nprobe stays at %d",
                     plan.factory, k, r, target, nprobe)  # fmt: skip
            break
    nprobe, r = trace[-1]
    set_nprobe(index, nprobe)
    return nprobe, r, trace


def build_tuned_index(vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, cfg: IndexConfig) -> BuiltIndex:
    """Try the candidate structures in order; keep the first that reaches ``cfg.target_recall``.

    ``vectors[N, d]`` float32 unit rows, ``ids[N]`` int64, ``queries[Q, d]`` float32.
    When no candidate reaches the target, the best one is kept if it clears ``cfg.recall_floor``;
    otherwise IndexQualityError.
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    exact_ids = exact_topk(vectors, ids, queries, RECALL_K)
    best: BuiltIndex | None = None
    notes: list[tuple[IndexPlan, str]] = []  # candidates that missed the target, and by how much
    for plan in plan_candidates(len(vectors), vectors.shape[1]):
        if plan.fallback:
            log.warning("index: %s", plan.fallback)
        log.info("index: building %s over %d vectors of dimension %d", plan.factory, len(vectors), vectors.shape[1])
        index, device = _train_and_add(plan, vectors, ids, cfg)
        nprobe, r, trace = tune_nprobe(index, plan, queries, exact_ids, cfg.target_recall)
        built = BuiltIndex(index, plan, nprobe, r, device, trace)
        if best is None or r > best.recall:
            best = built
        if r >= cfg.target_recall:
            break
        missed = f"{plan.type} {plan.factory} reached recall@{RECALL_K} {r:.4f} < target {cfg.target_recall} at nprobe={nprobe}"
        notes.append((plan, missed))
        log.warning("index: %s", notes[-1][1])
    assert best is not None
    others = [text for plan, text in notes if plan != best.plan]
    if others and best.plan.fallback:
        best = replace(best, plan=replace(best.plan, fallback=f"{best.plan.fallback}; tried first: {'; '.join(others)}"))
    if best.recall < cfg.recall_floor:
        raise IndexQualityError(
            f"best index {best.plan.factory} reaches ANN recall@{RECALL_K} {best.recall:.4f} at nprobe={best.nprobe}, "
            f"below the floor index.recall_floor={cfg.recall_floor}; the index is refused and the version cannot be published"
        )
    if best.recall < cfg.target_recall:
        log.warning(
            "index: recall@%d %.4f is below the target %.2f but above the floor %.2f; keeping %s",
            RECALL_K, best.recall, cfg.target_recall, cfg.recall_floor, best.plan.factory,
        )
    return best


# --- queries ------------------------------------------------------------------------------------


def noisy_item_queries(vectors: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` queries: sampled item vectors plus Gaussian noise of norm ~QUERY_NOISE_NORM, unit norm."""
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(vectors), size=min(n, len(vectors)), replace=False)
    noise = rng.normal(0.0, QUERY_NOISE_NORM / np.sqrt(vectors.shape[1]), size=(len(rows), vectors.shape[1]))
    q = vectors[rows] + noise.astype(np.float32)
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def sample_rows(x: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Up to ``n`` rows of ``x`` sampled without replacement (all rows when fewer)."""
    if len(x) <= n:
        return x
    return x[np.sort(np.random.default_rng(seed).choice(len(x), size=n, replace=False))]


# --- ANN offline metrics ------------------------------------------------------------------------


def ann_topk(index: Any, user_vecs: np.ndarray, seen: list[np.ndarray], k: int, n_items: int) -> np.ndarray:
    """Top-``k`` item_idx ``[U, k]`` through the index, each user's seen items removed (0-padded).

    Fetches k + (most items any user has seen) neighbours so k remain after the filter.
    """
    fetch = search_k(k, max((len(s) for s in seen), default=0), n_items)
    _, got = index.search(np.ascontiguousarray(user_vecs, dtype=np.float32), fetch)
    out = np.zeros((len(got), k), dtype=np.int64)
    for u, (row, s) in enumerate(zip(got, seen)):
        keep = row[(row > 0) & ~np.isin(row, s)][:k]
        out[u, : len(keep)] = keep
    return out


def ann_metrics(index: Any, artifact_dir: Path, prepared_dir: Path, n_items: int) -> dict[str, float]:
    """The offline metrics of jobs.evaluate, but ranking through the ANN index."""
    from jobs.evaluate import eval_queries, metrics_from_topk

    user_vecs, targets, seen = eval_queries(artifact_dir, prepared_dir)
    topk = ann_topk(index, user_vecs, seen, RECALL_K, n_items)
    return {k: float(v) for k, v in metrics_from_topk(topk, targets).items()}


# --- files --------------------------------------------------------------------------------------


def _fsync_replace(tmp: Path, final: Path) -> None:
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, final)


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON to ``path`` via a temporary file and rename: readers see old or new, never half."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    _fsync_replace(tmp, path)


def write_index_atomic(index: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    faiss.write_index(index, str(tmp))
    _fsync_replace(tmp, path)


def _remove_index_files(artifact_dir: Path) -> None:
    """A refused build must not leave an older index behind that looks publishable."""
    for name in (ARTIFACT_FILES["index_meta"], ARTIFACT_FILES["index"]):
        (artifact_dir / name).unlink(missing_ok=True)


# --- stage entry points -------------------------------------------------------------------------


def load_item_vectors(artifact_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Rows 1..n_items of item_embeddings.npy (float32 [n, d]) and their ids 1..n_items (int64)."""
    emb = np.load(Path(artifact_dir) / ARTIFACT_FILES["item_embeddings"])
    if emb.ndim != 2 or len(emb) < 2:
        raise ValueError(f"{artifact_dir}: item_embeddings.npy must be [n_items + 1, d], got shape {emb.shape}")
    return np.ascontiguousarray(emb[1:], dtype=np.float32), np.arange(1, len(emb), dtype=np.int64)


def build_index(settings: Settings, artifact_dir: Path, prepared_dir: Path | None) -> dict[str, Any]:
    """Build, tune and validate the index of one version; write index.faiss and index.json.

    With ``prepared_dir`` the queries are evaluation-split user vectors and "ann" metrics are
    merged into metrics.json; with None, noisy item vectors and no ANN metrics. Returns the
    index.json content plus ``ann`` (the ANN metrics, or None). Raises IndexQualityError (and
    removes any earlier index of this directory) when the recall floor is not met.
    """
    artifact_dir = Path(artifact_dir)
    cfg = settings.index
    t0 = time.time()
    vectors, ids = load_item_vectors(artifact_dir)
    if prepared_dir is not None:
        from jobs.evaluate import eval_queries

        user_vecs, _, _ = eval_queries(artifact_dir, Path(prepared_dir))
        queries = sample_rows(np.asarray(user_vecs, dtype=np.float32), cfg.eval_queries, cfg.seed)
        query_source = f"user vectors of the evaluation split ({len(queries)} of {len(user_vecs)})"
    else:
        queries = noisy_item_queries(vectors, cfg.eval_queries, cfg.seed)
        query_source = f"item vectors plus Gaussian noise of norm ~{QUERY_NOISE_NORM} ({len(queries)})"
    log.info("index %s: %d items x %d dims, queries: %s", artifact_dir.name, len(vectors), vectors.shape[1], query_source)
    threads_before = faiss.omp_get_max_threads()
    if cfg.threads > 0:
        faiss.omp_set_num_threads(cfg.threads)
    try:
        built = build_tuned_index(vectors, ids, queries, cfg)
    except IndexQualityError:
        _remove_index_files(artifact_dir)
        raise
    finally:
        faiss.omp_set_num_threads(threads_before)
    build_seconds = round(time.time() - t0, 3)
    meta = {
        "type": built.plan.type,
        "factory": built.plan.factory,
        "metric": "inner_product",
        "nlist": built.plan.nlist,
        "m": built.plan.m,
        "nbits": built.plan.nbits,
        "nprobe": built.nprobe,
        "ann_recall_at_100": round(built.recall, 6),
        "target_recall": cfg.target_recall,
        "recall_floor": cfg.recall_floor,
        "n_items": int(len(vectors)),
        "dim": int(vectors.shape[1]),
        "device": built.device,
        "build_seconds": build_seconds,
        "train_vectors": training_size(len(vectors), built.plan, cfg),
        "fallback": built.plan.fallback,
        "queries": query_source,
        "tuning": [{"nprobe": p, "recall_at_100": round(r, 6)} for p, r in built.tuning],
        "faiss_version": faiss.__version__,
    }
    write_index_atomic(built.index, artifact_dir / ARTIFACT_FILES["index"])
    write_json_atomic(artifact_dir / ARTIFACT_FILES["index_meta"], meta)  # last: its presence marks a complete index
    log.info(
        "index %s: %s nprobe=%d recall@100=%.4f on %s in %.1f s%s",
        artifact_dir.name, built.plan.factory, built.nprobe, built.recall, built.device, build_seconds,
        f" (fallback: {built.plan.fallback})" if built.plan.fallback else "",
    )
    ann = None
    if prepared_dir is not None:
        ann = ann_metrics(built.index, artifact_dir, Path(prepared_dir), len(vectors))
        metrics_path = artifact_dir / ARTIFACT_FILES["metrics"]
        metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
        metrics["ann"] = ann
        write_json_atomic(metrics_path, metrics)
        log.info("index %s: offline metrics through the index: %s", artifact_dir.name, ann)
    return {**meta, "ann": ann}


def read_index_meta(artifact_dir: Path) -> dict[str, Any]:
    """index.json of an artifact; FileNotFoundError naming the directory when the index is missing."""
    path = Path(artifact_dir) / ARTIFACT_FILES["index_meta"]
    if not path.exists():
        raise FileNotFoundError(f"{artifact_dir} has no {ARTIFACT_FILES['index_meta']}: the index stage has not completed")
    return json.loads(path.read_text())


def load_index(artifact_dir: Path) -> Any:
    """The CPU index of an artifact directory with nprobe set from index.json."""
    meta = read_index_meta(artifact_dir)
    index = faiss.read_index(str(Path(artifact_dir) / ARTIFACT_FILES["index"]))
    set_nprobe(index, int(meta.get("nprobe") or 0))
    return index

"""Faiss index over the item vectors of one model version (DESIGN §6).

    item_embeddings.npy rows 1..n_items (unit norm, ids = item_idx)
        -> candidates from jobs.index_params (IVF-PQ first; honest fallbacks for tiny corpora)
        -> train (on a seeded sample of nlist x ``index.train_points_per_list`` vectors) + add
           (labels = row positions 0..n-1) on the GPU when Faiss sees one (index_cpu_to_gpu),
           else on the CPU; the index is moved back with index_gpu_to_cpu before anything else
           happens
        -> nprobe raised until ANN recall@100 against exact inner-product search reaches
           ``index.target_recall`` on sampled queries (on the CPU index serving loads, so the
           stored recall is the served recall)
        -> 8-bit IVF-PQ whose codes level off below the target: exact re-ranking on the CPU
           (faiss.IndexRefineFlat over the filled codes + a copy of the float vectors): the
           re-ranking depth k_factor raised until the target is reached, then nprobe lowered
           while it holds (or raised, when the depth levels off first); see tune_refine
        -> wrapped in an IDMap (positions -> item ids: IndexRefine addresses its stored vectors
           by the labels the codes return, so those must be positions)
        -> index.faiss + index.json written atomically (index.json: nprobe, refine, k_factor,
           bytes per item); "ann" offline metrics merged into metrics.json (same protocol as the
           exact metrics, seen items excluded).

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
from typing import Any, Callable, Iterable, NamedTuple

import faiss
import numpy as np

from jobs.index_params import (
    GPU_MAX_K,
    MIN_POINTS_PER_CENTROID,
    IndexPlan,
    bytes_per_item,
    choose_device,
    k_factor_schedule,
    nprobe_schedule,
    plan_candidates,
    search_k,
)
from twotower.config import IndexConfig, Settings
from twotower.contracts import ARTIFACT_FILES

log = logging.getLogger(__name__)

RECALL_K = 100
"""Recall is measured as overlap of the top-100 ANN and exact neighbours."""
QUERY_NOISE_NORM = 0.5
"""Expected norm of the noise added to item vectors when no user queries are available."""
RECALL_PLATEAU = 0.002
"""IVF-PQ tuning stops raising one knob below the target when one step gains less recall@100
than this: something else limits recall then, and every further step only slows search. For
nprobe on the codes alone that is the codes (1M synthetic items: 0.9058 at nprobe 96, 0.9073 at
128 of 4096 lists; 0.9095 at 2048, which is 10x slower), and exact re-ranking is tried next
(there: 0.956 at nprobe 32 with 2x100 candidates re-ranked); for the re-ranking depth it is the
probed lists, and nprobe is raised again."""


class IndexQualityError(RuntimeError):
    """The best index reachable is below ``index.recall_floor``; nothing was written."""


class TuningStep(NamedTuple):
    """One measured setting: recall@100 at ``nprobe`` lists and re-ranking depth ``k_factor``
    (``k_factor x k`` candidates from the codes re-ranked exactly; 0 = the codes' order)."""

    nprobe: int
    k_factor: int
    recall: float


@dataclass(frozen=True)
class BuiltIndex:
    """A trained, filled, tuned CPU index and what was measured about it."""

    index: Any  # faiss.IndexIDMap (CPU) over the plan's structure, or over its IndexRefineFlat
    plan: IndexPlan
    nprobe: int
    k_factor: int  # re-ranking depth; 0: no re-ranking stage
    recall: float
    device: str
    tuning: list[TuningStep]  # in the order tried (the chosen setting is not always the last)


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
    """Set nprobe on a CPU index, through IDMap and re-ranking wrappers (no-op for exact Flat)."""
    if nprobe > 0:
        faiss.ParameterSpace().set_index_parameter(index, "nprobe", nprobe)


def set_k_factor(index: Any, k_factor: int) -> None:
    """Set the re-ranking depth of an index with a re-ranking stage (no-op for 0).
    ("k_factor_rf" is IndexRefine's name in ParameterSpace; "k_factor" means IndexIVFPQR's.)"""
    if k_factor > 0:
        faiss.ParameterSpace().set_index_parameter(index, "k_factor_rf", k_factor)


def refine_stage(index: Any) -> Any | None:
    """The IndexRefine of ``index`` (bare or under an IDMap), or None when it has none."""
    inner = faiss.downcast_index(index)
    if isinstance(inner, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        inner = faiss.downcast_index(inner.index)
    return inner if isinstance(inner, faiss.IndexRefine) else None


def search_params(index: Any, nprobe: int) -> Any | None:
    """Per-call parameters that probe ``nprobe`` lists of ``index`` and keep its re-ranking depth;
    None for an exact index. The shared index is not modified (concurrent searches unaffected).

    An IndexRefine rejects SearchParametersIVF, and IndexRefineSearchParameters replaces the
    index's own k_factor (its default, 1, would turn re-ranking into mere re-scoring), so both
    are passed explicitly.
    """
    if faiss.try_extract_index_ivf(index) is None:
        return None
    ivf = faiss.SearchParametersIVF(nprobe=nprobe)
    refine = refine_stage(index)
    if refine is None:
        return ivf
    return faiss.IndexRefineSearchParameters(k_factor=refine.k_factor, base_index_params=ivf)


def id_mapped(index: Any, ids: np.ndarray) -> Any:
    """``index`` (filled, labels = positions 0..n-1) behind an IndexIDMap answering ``ids[position]``.

    IndexIDMap's constructor refuses a non-empty index (it expects to see every add, and on the
    GPU path the adds happened on the GPU before the re-ranking stage existed), so the map is
    made over the empty view and then given the ids of the ``n`` positions already there.
    """
    n = index.ntotal
    if len(ids) != n:
        raise ValueError(f"{len(ids)} ids for an index of {n} vectors")
    index.ntotal = 0
    try:
        wrapped = faiss.IndexIDMap(index)  # keeps a Python reference to ``index``
    finally:
        index.ntotal = n
    faiss.copy_array_to_vector(np.ascontiguousarray(ids, dtype=np.int64), wrapped.id_map)
    wrapped.ntotal = n
    return wrapped


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


def _train_and_add(plan: IndexPlan, vectors: np.ndarray, cfg: IndexConfig) -> tuple[Any, str]:
    """A filled CPU index of ``plan`` labelled by position 0..n-1, and the device it was trained
    on (one path, placement aside; a GPU index given no ids numbers the vectors the same way)."""
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
    work.add(vectors)
    if device == "gpu":
        index = faiss.index_gpu_to_cpu(work)
    return index, device


def measure_recall(index: Any, queries: np.ndarray, exact: np.ndarray) -> float:
    """Recall@k of ``index`` as it is set now, against ``exact [Q, k]`` (same labels)."""
    _, got = index.search(queries, exact.shape[1])
    return recall_at_k(got, exact)


def climb(
    measure: Callable[[int], float], values: Iterable[int], target: float, plateau: bool, prev: float | None = None
) -> list[tuple[int, float]]:
    """Measure ``values`` in order until recall reaches ``target`` or, with ``plateau``, one step
    gains less than RECALL_PLATEAU over the one before (``prev``: recall before the first value).
    Returns [(value, recall), ...] as measured; the last one is where it stopped."""
    out: list[tuple[int, float]] = []
    for v in values:
        r = measure(v)
        before = out[-1][1] if out else prev
        out.append((v, r))
        if r >= target or (plateau and before is not None and r - before < RECALL_PLATEAU):
            break
    return out


def tune_nprobe(
    index: Any, plan: IndexPlan, queries: np.ndarray, exact_ids: np.ndarray, target: float
) -> tuple[int, float, list[tuple[int, float]]]:
    """Smallest nprobe on the schedule whose recall@k reaches ``target`` (or the largest tried).

    For IVF-PQ, raising nprobe also stops below the target once a step gains less than
    RECALL_PLATEAU (the recall the codes allow is reached; IVF-Flat always probes on, since
    probing every list is exact). Returns (nprobe, recall, [(nprobe, recall), ...]); Flat
    indexes return (0, recall, ...). ``exact_ids`` are in the index's labels.
    """
    if not plan.is_ivf:
        r = measure_recall(index, queries, exact_ids)
        return 0, r, [(0, r)]

    def at(nprobe: int) -> float:
        set_nprobe(index, nprobe)
        r = measure_recall(index, queries, exact_ids)
        log.info("index %s: nprobe=%d of %d lists gives recall@%d %.4f", plan.factory, nprobe, plan.nlist, RECALL_K, r)
        return r

    steps = climb(at, nprobe_schedule(plan.nlist, GPU_MAX_K), target, plateau=plan.type == "IVF-PQ")
    nprobe, r = steps[-1]
    if r < target and plan.type == "IVF-PQ" and len(steps) > 1 and r - steps[-2][1] < RECALL_PLATEAU:
        log.info("index %s: recall@%d from the codes alone has levelled off at %.4f below the target %.2f; nprobe stays at %d",
                 plan.factory, RECALL_K, r, target, nprobe)  # fmt: skip
    set_nprobe(index, nprobe)
    return nprobe, r, steps


def tune_refine(
    base: Any, vectors: np.ndarray, plan: IndexPlan, queries: np.ndarray, exact_ids: np.ndarray, target: float,
    nprobe: int, base_recall: float,
) -> tuple[Any, int, int, float, list[TuningStep]]:  # fmt: skip
    """Exact re-ranking over ``base`` (filled IVF-PQ tuned to ``nprobe`` / ``base_recall``):
    (IndexRefineFlat, nprobe, k_factor, recall, steps).

    The re-ranking stage keeps a copy of ``vectors`` (4·d bytes per item) and re-scores the
    ``k_factor x k`` best candidates of the codes by exact inner product. Tuned in three bounded
    walks, each step one search of the tuning queries:

    1. k_factor along k_factor_schedule (2, 4, 8, 16 for k=100) at ``nprobe``, until the target
       is reached or a step gains < RECALL_PLATEAU (the probed lists limit recall then);
    2. reached: nprobe lowered along the schedule while recall stays >= target (``nprobe`` was
       chosen for ranking from codes alone; re-ranked candidates usually need fewer lists);
    3. not reached: nprobe raised along the schedule at that k_factor, with the plateau rule.
    """
    refined = faiss.IndexRefineFlat(base, faiss.swig_ptr(vectors))  # copies the vectors
    steps: list[TuningStep] = []

    def at(p: int, kf: int) -> float:
        set_nprobe(refined, p)
        refined.k_factor = kf
        r = measure_recall(refined, queries, exact_ids)
        steps.append(TuningStep(p, kf, r))
        log.info("index %s: nprobe=%d, exact re-ranking of %d x %d candidates gives recall@%d %.4f",
                 plan.factory, p, kf, RECALL_K, RECALL_K, r)  # fmt: skip
        return r

    k_factor, r = climb(lambda kf: at(nprobe, kf), k_factor_schedule(RECALL_K), target, plateau=True, prev=base_recall)[-1]
    schedule = nprobe_schedule(plan.nlist, GPU_MAX_K)
    if r >= target:
        for p in reversed([p for p in schedule if p < nprobe]):
            rp = at(p, k_factor)
            if rp < target:
                break
            nprobe, r = p, rp
    else:
        higher = [p for p in schedule if p > nprobe]
        if higher:
            nprobe, r = climb(lambda p: at(p, k_factor), higher, target, plateau=True, prev=r)[-1]
    if r < target:
        log.info("index %s: with exact re-ranking recall@%d levels off at %.4f below the target %.2f (nprobe %d, k_factor %d)",
                 plan.factory, RECALL_K, r, target, nprobe, k_factor)  # fmt: skip
    set_nprobe(refined, nprobe)
    refined.k_factor = k_factor
    return refined, nprobe, k_factor, r, steps


def build_tuned_index(vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, cfg: IndexConfig) -> BuiltIndex:
    """Try the candidate structures in order; keep the first that reaches ``cfg.target_recall``.

    ``vectors[N, d]`` float32 unit rows, ``ids[N]`` int64, ``queries[Q, d]`` float32.
    When no candidate reaches the target, the best one is kept if it clears ``cfg.recall_floor``;
    otherwise IndexQualityError.
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    exact_pos = exact_topk(vectors, np.arange(len(vectors), dtype=np.int64), queries, RECALL_K)  # the labels tuning sees
    best: BuiltIndex | None = None
    notes: list[tuple[IndexPlan, str]] = []  # candidates that missed the target, and by how much
    for plan in plan_candidates(len(vectors), vectors.shape[1]):
        if plan.fallback:
            log.warning("index: %s", plan.fallback)
        log.info("index: building %s over %d vectors of dimension %d", plan.factory, len(vectors), vectors.shape[1])
        index, device = _train_and_add(plan, vectors, cfg)
        nprobe, r, codes_steps = tune_nprobe(index, plan, queries, exact_pos, cfg.target_recall)
        trace = [TuningStep(p, 0, rp) for p, rp in codes_steps]
        k_factor = 0
        if plan.refine and r < cfg.target_recall:
            refined, p, kf, rr, more = tune_refine(index, vectors, plan, queries, exact_pos, cfg.target_recall, nprobe, r)
            trace += more
            if rr > r:  # else the stored vectors buy nothing: keep the codes alone
                index, nprobe, k_factor, r = refined, p, kf, rr
        built = BuiltIndex(id_mapped(index, ids), plan, nprobe, k_factor, r, device, trace)
        if best is None or r > best.recall:
            best = built
        if r >= cfg.target_recall:
            break
        missed = f"{plan.type} {plan.factory} reached recall@{RECALL_K} {r:.4f} < target {cfg.target_recall} at {setting(built)}"
        notes.append((plan, missed))
        log.warning("index: %s", notes[-1][1])
    assert best is not None
    others = [text for plan, text in notes if plan != best.plan]
    if others and best.plan.fallback:
        best = replace(best, plan=replace(best.plan, fallback=f"{best.plan.fallback}; tried first: {'; '.join(others)}"))
    if best.recall < cfg.recall_floor:
        raise IndexQualityError(
            f"best index {best.plan.factory} reaches ANN recall@{RECALL_K} {best.recall:.4f} at {setting(best)}, "
            f"below the floor index.recall_floor={cfg.recall_floor}; the index is refused and the version cannot be published"
        )
    if best.recall < cfg.target_recall:
        log.warning(
            "index: recall@%d %.4f is below the target %.2f but above the floor %.2f; keeping %s",
            RECALL_K, best.recall, cfg.target_recall, cfg.recall_floor, best.plan.factory,
        )
    return best


def setting(built: BuiltIndex) -> str:
    """``nprobe=64`` or ``nprobe=64, exact re-ranking of 4x100 candidates`` (for messages)."""
    if not built.k_factor:
        return f"nprobe={built.nprobe}"
    return f"nprobe={built.nprobe}, exact re-ranking of {built.k_factor}x{RECALL_K} candidates"


def index_meta(built: BuiltIndex, cfg: IndexConfig) -> dict[str, Any]:
    """The index.json fields that describe the built index: structure, tuned settings, measured
    recall, memory per item (``refine_bytes_per_item``: the float vectors the re-ranking stage
    keeps, 4·d, 0 without one) and the tuning trace. Callers add where and how it was built."""
    n, d = int(built.index.ntotal), int(built.index.d)
    memory = bytes_per_item(built.plan, d, built.k_factor > 0)
    return {
        "type": built.plan.type,
        "factory": built.plan.factory,
        "metric": "inner_product",
        "nlist": built.plan.nlist,
        "m": built.plan.m,
        "nbits": built.plan.nbits,
        "nprobe": built.nprobe,
        "refine": built.k_factor > 0,
        "k_factor": built.k_factor,
        "refine_bytes_per_item": memory["refine"],
        "bytes_per_item": memory,
        "index_mib": round(memory["total"] * n / 2**20, 1),
        "ann_recall_at_100": round(built.recall, 6),
        "target_recall": cfg.target_recall,
        "recall_floor": cfg.recall_floor,
        "n_items": n,
        "dim": d,
        "device": built.device,
        "fallback": built.plan.fallback,
        "tuning": [{"nprobe": t.nprobe, "k_factor": t.k_factor, "recall_at_100": round(t.recall, 6)} for t in built.tuning],
    }


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
        **index_meta(built, cfg),
        "build_seconds": build_seconds,
        "train_vectors": training_size(len(vectors), built.plan, cfg),
        "queries": query_source,
        "faiss_version": faiss.__version__,
    }
    write_index_atomic(built.index, artifact_dir / ARTIFACT_FILES["index"])
    write_json_atomic(artifact_dir / ARTIFACT_FILES["index_meta"], meta)  # last: its presence marks a complete index
    log.info(
        "index %s: %s %s recall@100=%.4f on %s in %.1f s%s",
        artifact_dir.name, built.plan.factory, setting(built), built.recall, built.device, build_seconds,
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
    """The CPU index of an artifact directory with nprobe and the re-ranking depth set from
    index.json (the depth is also stored in index.faiss; index.json is what was measured)."""
    meta = read_index_meta(artifact_dir)
    index = faiss.read_index(str(Path(artifact_dir) / ARTIFACT_FILES["index"]))
    set_nprobe(index, int(meta.get("nprobe") or 0))
    set_k_factor(index, int(meta.get("k_factor") or 0))
    return index

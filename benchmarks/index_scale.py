"""Index at scale: build time, search QPS and recall@100 against exact search, for the product's
own index builder (jobs.index.build_tuned_index) on 1M clustered synthetic items, on the CPU.

    python -m benchmarks.index_scale [--items 1000000] [--dim 64] [--gpu-items 10000000]

Items: ``n`` unit vectors of dimension ``d`` around ``CLUSTERS`` centres with power-law cluster
sizes, the centres on a random rank-``RANK`` subspace (learned embeddings are clustered and far
from isotropic), plus within-cluster spread and a little isotropic noise. Seeded.

Build: ``build_tuned_index`` with the default IndexConfig, exactly as the nightly index stage
calls it: structure from jobs.index_params (1M, d=64: IVF4096,PQ32x8), k-means on a sample of
``index.train_points_per_list`` vectors per list, add everything, nprobe raised until recall@100
on ``index.eval_queries`` noisy item queries reaches ``index.target_recall``; when the codes
alone level off below it, exact re-ranking (IndexRefineFlat: ``k_factor x 100`` candidates from
the codes re-scored on stored float vectors, +4·d bytes per item) with k_factor and nprobe tuned
(jobs.index.tune_refine). The build time includes the exact ground truth of those tuning queries
and the tuning, as in production.

Search, on other (held-out) noisy item queries, at the tuned nprobe and k_factor:
  * recall@100 against exact inner-product search (faiss.IndexFlatIP over the same vectors);
  * batch QPS: all held-out queries in one ``search`` call, Faiss on every core;
  * single-query QPS and latency: one query per ``search`` call on 1 thread (what one serving
    request does; serving runs Faiss at ``serving.compute_threads`` = 1).

The built index is kept in ``benchmarks/out/cache/index-<hash of spec>/`` (index.faiss,
index.json); benchmarks.serving_latency serves that index instead of building its own.

GPU row: with faiss-gpu and a visible GPU, the same build for ``--gpu-items`` (10M) with
``index.use_gpu=yes`` (trained on the GPU, moved back with index_gpu_to_cpu) and batch QPS on a
GPU copy of the codes (the re-ranking stage and the id map stay on the CPU around it: the GPU
cloner does not take IndexRefine). Without one it is not run, and the result says why.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.limits_common import cache_dir, cli, fmt, header, percentiles
from twotower.config import IndexConfig, Settings, load_settings

log = logging.getLogger("benchmarks.index_scale")

NAME = "index_scale"
CLUSTERS = 2000
RANK = 16
"""Intrinsic dimension of the centres and of the within-cluster spread."""
CLUSTER_SPREAD = 0.6
"""Norm of the within-cluster offset (in the rank-RANK subspace) relative to the unit centre."""
NOISE = 0.1
"""Norm of the isotropic noise added to each vector before re-normalising."""
GENERATOR = "clustered-rank16-v1"
"""Changes whenever the generator does, so a cached index is never reused for other vectors."""
BUILDER = "refine-v1"
"""Changes whenever the builder's output does (refine-v1: IDMap over positions, exact re-ranking
when the codes level off), so a cached index of an older builder is never served."""
VECTOR_SEED = 11
QUERY_SEED = 12
HELDOUT_SEED = 13
CHUNK = 200_000


def clustered_item_vectors(n: int, d: int, seed: int = VECTOR_SEED) -> np.ndarray:
    """``float32 [n, d]`` unit vectors as described in the module docstring (generated in chunks)."""
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(RANK, d)).astype(np.float32) / np.sqrt(RANK)
    centres = rng.normal(size=(CLUSTERS, RANK)).astype(np.float32)
    sizes = 1.0 / np.arange(1, CLUSTERS + 1) ** 0.8
    sizes /= sizes.sum()
    out = np.empty((n, d), dtype=np.float32)
    for start in range(0, n, CHUNK):
        m = min(n, start + CHUNK) - start
        c = rng.choice(CLUSTERS, size=m, p=sizes)
        z = centres[c] + rng.normal(0.0, CLUSTER_SPREAD, size=(m, RANK)).astype(np.float32)
        x = z @ basis
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        x += rng.normal(0.0, NOISE / np.sqrt(d), size=x.shape).astype(np.float32)
        out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def index_spec(n_items: int, d: int, cfg: IndexConfig, device: str = "cpu") -> dict[str, Any]:
    """Everything that decides the built index (the cache key)."""
    import faiss

    return {"n_items": n_items, "dim": d, "generator": GENERATOR, "vector_seed": VECTOR_SEED, "query_seed": QUERY_SEED,
            "train_points_per_list": cfg.train_points_per_list, "target_recall": cfg.target_recall,
            "eval_queries": cfg.eval_queries, "index_seed": cfg.seed, "faiss": faiss.__version__, "device": device,
            "builder": BUILDER}  # fmt: skip


def build(vectors: np.ndarray, cfg: IndexConfig):
    """The product's tuned build over ``vectors`` (ids 1..n); returns (BuiltIndex, seconds)."""
    from jobs.index import build_tuned_index, noisy_item_queries

    queries = noisy_item_queries(vectors, cfg.eval_queries, QUERY_SEED)
    ids = np.arange(1, len(vectors) + 1, dtype=np.int64)
    t0 = time.perf_counter()
    built = build_tuned_index(vectors, ids, queries, cfg)
    return built, time.perf_counter() - t0


def index_meta(built, build_s: float, cfg: IndexConfig) -> dict[str, Any]:
    """index.json content of a benchmark index (jobs.index.index_meta plus how it was built)."""
    from jobs.index import index_meta as built_meta

    return {**built_meta(built, cfg), "build_seconds": round(build_s, 2),
            "queries": f"synthetic item vectors plus Gaussian noise ({cfg.eval_queries})"}  # fmt: skip


def ensure_index(n_items: int, d: int, cfg: IndexConfig) -> tuple[Path, dict[str, Any], bool]:
    """(cache directory holding index.faiss + index.json, its meta, built now?) for this spec;
    builds and stores it when missing. Used by benchmarks.serving_latency."""
    from jobs.index import write_index_atomic, write_json_atomic

    root = cache_dir("index", index_spec(n_items, d, cfg))
    meta_path = root / "index.json"
    if meta_path.exists():
        return root, json.loads(meta_path.read_text()), False
    root.mkdir(parents=True, exist_ok=True)
    built, build_s = build(clustered_item_vectors(n_items, d), cfg)
    meta = index_meta(built, build_s, cfg)
    write_index_atomic(built.index, root / "index.faiss")
    write_json_atomic(meta_path, meta)  # last: marks the cache entry complete
    return root, meta, True


def search_rates(index, vectors: np.ndarray, n_queries: int, n_single: int, k: int = 100) -> dict[str, Any]:
    """Recall@k against exact search, batch QPS (all cores) and single-query QPS (1 thread)."""
    import faiss

    from jobs.index import exact_topk, noisy_item_queries, recall_at_k

    queries = noisy_item_queries(vectors, n_queries, HELDOUT_SEED)
    ids = np.arange(1, len(vectors) + 1, dtype=np.int64)
    t0 = time.perf_counter()
    exact = exact_topk(vectors, ids, queries, k)
    exact_s = time.perf_counter() - t0
    index.search(queries[:10], k)  # warm-up (page in the codes)
    t0 = time.perf_counter()
    _, got = index.search(queries, k)
    batch_s = time.perf_counter() - t0
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        lat = []
        for q in queries[:n_single]:
            t = time.perf_counter()
            index.search(q[None, :], k)
            lat.append((time.perf_counter() - t) * 1000)
    finally:
        faiss.omp_set_num_threads(threads)
    return {
        "k": k,
        "held_out_queries": len(queries),
        "recall_at_k": round(recall_at_k(got, exact), 4),
        "batch": {"queries": len(queries), "seconds": round(batch_s, 3), "qps": round(len(queries) / batch_s), "threads": threads},
        "single": {"queries": len(lat), "qps": round(len(lat) / (sum(lat) / 1000)) if lat else None,
                   "latency_ms": percentiles(lat, 3), "threads": 1},  # fmt: skip
        "exact_search": {"seconds": round(exact_s, 3), "qps": round(len(queries) / exact_s)},
    }


def gpu_search_copy(index, resources):
    """A copy of a built index (IDMap over IVF-PQ, or over IndexRefineFlat over IVF-PQ) that
    scans the codes on GPU 0; the re-ranking stage (same k_factor, same stored vectors) and the id
    map stay on the CPU around it, since index_cpu_to_gpu does not take IndexRefine.
    ``index`` must outlive the copy (the stored vectors are shared, not copied)."""
    import faiss

    from jobs.index import id_mapped, refine_stage

    refine = refine_stage(index)
    codes = refine.base_index if refine is not None else faiss.downcast_index(index).index
    out = faiss.index_cpu_to_gpu(resources, 0, codes)
    if refine is not None:
        out = faiss.IndexRefine(out, refine.refine_index)  # k_factor x k <= GPU_MAX_K by the tuning schedule
        out.k_factor = refine.k_factor
    return id_mapped(out, faiss.vector_to_array(faiss.downcast_index(index).id_map))


def gpu_row(n_items: int, d: int, cfg: IndexConfig, n_queries: int) -> dict[str, Any]:
    """The same build and search on a GPU for ``n_items``, or why it was not measured."""
    import faiss

    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if gpus == 0:
        return {"measured": False, "n_items": n_items,
                "reason": f"no GPU on this machine (faiss {faiss.__version__} sees 0 GPUs); the faiss-gpu path is "
                          "jobs.index._train_and_add with index.use_gpu=yes: index_cpu_to_gpu, train and add on the GPU, "
                          "index_gpu_to_cpu, then the exact re-ranking stage on the CPU"}  # fmt: skip
    from dataclasses import replace

    vectors = clustered_item_vectors(n_items, d)
    built, build_s = build(vectors, replace(cfg, use_gpu="yes"))
    res = faiss.StandardGpuResources()
    rates = search_rates(gpu_search_copy(built.index, res), vectors, n_queries, 0)
    name = ""
    try:
        import torch

        name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""
    except Exception:  # noqa: BLE001 - the model name is informative only
        pass
    return {"measured": True, "n_items": n_items, "gpu": name or f"{gpus} GPU(s)", "build_seconds": round(build_s, 2),
            "factory": built.plan.factory, "nprobe": built.nprobe, "k_factor": built.k_factor, "device": built.device,
            "recall_at_100": rates["recall_at_k"], "batch_qps": rates["batch"]["qps"]}  # fmt: skip


def run(n_items: int = 1_000_000, d: int = 64, n_queries: int = 1000, n_single: int = 300, gpu_items: int = 10_000_000,
        settings: Settings | None = None, argv: list[str] | None = None) -> dict[str, Any]:  # fmt: skip
    """Build (always, timed) and measure; stores the index in the cache for serving_latency."""
    from jobs.index import setting, training_size, write_index_atomic, write_json_atomic

    cfg = (settings or load_settings()).index
    t0 = time.perf_counter()
    vectors = clustered_item_vectors(n_items, d)
    gen_s = time.perf_counter() - t0
    log.info("%d clustered vectors of dimension %d generated in %.1f s", n_items, d, gen_s)
    built, build_s = build(vectors, cfg)
    log.info("built %s in %.1f s: %s, tuning recall@100 %.4f", built.plan.factory, build_s, setting(built), built.recall)
    rates = search_rates(built.index, vectors, n_queries, n_single)
    root = cache_dir("index", index_spec(n_items, d, cfg))
    root.mkdir(parents=True, exist_ok=True)
    write_index_atomic(built.index, root / "index.faiss")
    meta = index_meta(built, build_s, cfg)
    write_json_atomic(root / "index.json", meta)
    return {
        **header(NAME, argv),
        "items": {"n": n_items, "dim": d, "generator": GENERATOR, "clusters": CLUSTERS, "rank": RANK, "generate_seconds": round(gen_s, 2)},
        "cpu": {
            "factory": built.plan.factory, "nlist": built.plan.nlist, "m": built.plan.m, "nbits": built.plan.nbits,
            "device": built.device, "build_seconds": round(build_s, 2), "train_vectors": training_size(n_items, built.plan, cfg),
            "train_points_per_list": cfg.train_points_per_list, "nprobe": built.nprobe,
            "refine": meta["refine"], "k_factor": meta["k_factor"], "bytes_per_item": meta["bytes_per_item"],
            "index_mib": meta["index_mib"], "tuning": meta["tuning"],
            "tuning_recall_at_100": round(built.recall, 4), "target_recall": cfg.target_recall, **rates,
        },  # fmt: skip
        "gpu": gpu_row(gpu_items, d, cfg, n_queries),
        "cache": str(root),
    }


def render(result: dict[str, Any]) -> list[str]:
    """Markdown lines of the index section."""
    c, g, it = result["cpu"], result["gpu"], result["items"]
    lines = [
        f"{fmt(it['n'])} clustered synthetic items, d={it['dim']} "
        f"({it['clusters']} power-law clusters on a rank-{it['rank']} subspace), built by `jobs.index.build_tuned_index` "
        f"(training sample {fmt(c['train_vectors'])} vectors = {c['train_points_per_list']} per list; build includes the "
        f"exact ground truth, nprobe tuning and, when the codes level off below the target, re-ranking tuning). "
        f"Recall and QPS on {c['held_out_queries']} held-out noisy item queries.",
        "",
        "| device | items | index | build (s) | nprobe | exact re-ranking | recall@100 vs exact | batch QPS | single-query QPS (1 thread) | single-query p50 / p99 (ms) |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| CPU ({c['batch']['threads']} threads for build and batch) | {fmt(it['n'])} | {c['factory']} | {fmt(c['build_seconds'], 1)} | "
        f"{c['nprobe']} | {rerank_label(c['k_factor'], c['k'])} | {c['recall_at_k']:.4f} | {fmt(c['batch']['qps'])} | {fmt(c['single']['qps'])} | "
        f"{c['single']['latency_ms']['p50']} / {c['single']['latency_ms']['p99']} |",
    ]  # fmt: skip
    if g["measured"]:
        lines.append(f"| GPU ({g['gpu']}) | {fmt(g['n_items'])} | {g['factory']} | {fmt(g['build_seconds'], 1)} | {g['nprobe']} | "
                     f"{rerank_label(g['k_factor'], c['k'])} | {g['recall_at_100']:.4f} | {fmt(g['batch_qps'])} | - | - |")  # fmt: skip
    else:
        lines.append(f"| GPU | {fmt(g['n_items'])} | not measured: {g['reason']} | - | - | - | - | - | - | - |")
    b = c["bytes_per_item"]
    lines += [
        "",
        f"Memory: {b['total']} bytes per item ({b['codes']} code, {b['ids']} ids, {b['refine']} float vector kept for the "
        f"re-ranking), {fmt(c['index_mib'], 1)} MiB for {fmt(it['n'])} items, centroids and codebooks aside. "
        + tuning_text(c["tuning"]),
        "",
        f"Exact brute-force search for comparison: {fmt(c['exact_search']['qps'])} QPS (batch, same queries).",
        "",
    ]  # fmt: skip
    return lines


def tuning_text(tuning: list[dict[str, Any]]) -> str:
    """Where the codes alone stopped and every re-ranking step after it, in words."""
    codes = [t for t in tuning if not t["k_factor"]]
    text = f"Tuning: the codes alone reach recall@100 {codes[-1]['recall_at_100']:.4f} at nprobe {codes[-1]['nprobe']}" if codes else "Tuning:"
    rerank = [f"nprobe {t['nprobe']} x k_factor {t['k_factor']}: {t['recall_at_100']:.4f}" for t in tuning if t["k_factor"]]
    return text + (f"; with exact re-ranking (in the order tried) {', '.join(rerank)}." if rerank else ".")


def rerank_label(k_factor: int, k: int) -> str:
    """``top 400 of the codes`` (k_factor 4, k 100) or ``no``."""
    return f"top {k_factor * k} of the codes" if k_factor else "no"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--queries", type=int, default=1000, help="held-out queries for recall and batch QPS")
    p.add_argument("--single", type=int, default=300, help="queries timed one at a time")
    p.add_argument("--gpu-items", type=int, default=10_000_000)


def main(argv: list[str] | None = None) -> int:
    return cli(NAME, __doc__, add_args, lambda a, argv: run(a.items, a.dim, a.queries, a.single, a.gpu_items, argv=argv), render, argv)


if __name__ == "__main__":
    sys.exit(main())

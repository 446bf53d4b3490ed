"""/recall latency on CPU, through the real HTTP server, for two corpora.

    movielens   the version published under ``settings.redis.prefix`` (``make run`` publishes
                MovieLens-100K: 1,682 items); when nothing is published, the main job runs first
    synthetic   1,000,000 items in an IVF-PQ index built and tuned by jobs.index
                (build_tuned_index: nlist, M and nprobe from the corpus size, nprobe raised until
                recall@100 reaches the target on sampled queries), served by the same code path

The synthetic version follows the artifact and Redis contracts: the MovieLens version's trained
user tower and user-ID rows, an item-ID table grown to 1M rows, item vectors drawn around 2,000
random unit centres (clustered like real embeddings; no model could be trained on 1M items
here), the index over them, and a pointer of its own under ``<prefix>-bench1m``. The user tower
is the trained one, so per-request model work is what production does; only the item side is
synthetic.

Each corpus: a fresh ``python -m serving.app`` subprocess on a free port (torch and Faiss at
``serving.compute_threads``), warm-up, then sequential GET /recall/<user>?k=100 from one client
(90% known users, 10% cold-start ids). Latency = client-side wall time per request (HTTP
included); the server's own ``took_ms`` (Redis + user tower + search) is reported beside it.

    python -m benchmarks.serving_latency [--items 1000000] [--requests 2000] [--skip-synthetic]

Results: benchmarks/out/serving_latency.json (machine info and the command included).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from twotower.config import PROJECT_ROOT, Settings

log = logging.getLogger("benchmarks.serving_latency")

OUT = PROJECT_ROOT / "benchmarks" / "out" / "serving_latency.json"
K = 100
COLD_FRACTION = 0.1
SYNTHETIC_RANK = 16
"""Intrinsic dimension of the synthetic item vectors (learned embeddings are far from isotropic)."""
SYNTHETIC_NOISE = 0.2
"""Norm of the isotropic noise added to each synthetic vector before re-normalising."""
SYNTHETIC_QUERIES = 500
TRAIN_NITER = 10
"""k-means iterations of the synthetic index (coarse quantizer and PQ codebooks)."""
PQ_POINTS_PER_CENTROID = 80
"""PQ codebook training points per code (80 x 256 = 20,480 residuals)."""
RECALL_PLATEAU = 0.003
"""nprobe tuning stops when doubling nprobe gains less recall@100 than this."""


# --- machine -------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """CPU, cores, memory, load and library versions: enough to compare two runs honestly."""
    import faiss
    import torch

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    return {
        "cpu": cpu or platform.processor(),
        "cores": os.cpu_count(),
        "memory_gib": mem_gib,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "faiss": faiss.__version__,
        "gpu": False,
    }


# --- the server under test -----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m serving.app`` for one deployment prefix, on a free localhost port."""

    def __init__(self, settings: Settings, prefix: str, log_path: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "TT_REDIS_PREFIX": prefix,
            "TT_PATHS_STATE_DIR": str(settings.paths.state_dir),
            "REDIS_URL": settings.redis.url,
            "TT_SERVING_HOST": "127.0.0.1",
            "TT_SERVING_PORT": str(self.port),
            "TT_SERVING_COMPUTE_THREADS": str(settings.serving.compute_threads),
            "TT_LOG_LEVEL": "WARNING",
        }
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "ServerProcess":
        import httpx

        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "serving.app"], cwd=PROJECT_ROOT, env=self.env,
                                     stdout=self._log, stderr=subprocess.STDOUT)  # fmt: skip
        deadline = time.time() + 300  # loading a 1M-item version takes a while
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}; see {self.log_path}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the server did not become ready in 300 s; see {self.log_path}")

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def measure(url: str, users: list[str], n_requests: int, seed: int = 0, warmup: int = 50) -> dict[str, Any]:
    """Sequential GET /recall; latency percentiles in milliseconds (client and server side)."""
    import httpx

    rng = np.random.default_rng(seed)
    picks = [
        f"cold-{i}" if rng.random() < COLD_FRACTION else users[int(rng.integers(len(users)))]
        for i in range(n_requests + warmup)
    ]
    client_ms: list[float] = []
    server_ms: list[float] = []
    errors = 0
    with httpx.Client(base_url=url, timeout=30) as client:
        for i, uid in enumerate(picks):
            t0 = time.perf_counter()
            r = client.get(f"/recall/{uid}", params={"k": K})
            dt_ms = (time.perf_counter() - t0) * 1000
            if i < warmup:
                continue
            if r.status_code != 200 or len(r.json()["items"]) != K:
                errors += 1
                continue
            client_ms.append(dt_ms)
            server_ms.append(r.json()["took_ms"])

    def pct(xs: list[float]) -> dict[str, float]:
        a = np.asarray(xs)
        return {"p50": round(float(np.percentile(a, 50)), 3), "p90": round(float(np.percentile(a, 90)), 3),
                "p99": round(float(np.percentile(a, 99)), 3), "mean": round(float(a.mean()), 3)}  # fmt: skip

    return {"requests": len(client_ms), "errors": errors, "k": K, "cold_fraction": COLD_FRACTION,
            "client_ms": pct(client_ms), "server_ms": pct(server_ms)}  # fmt: skip


# --- the MovieLens version -----------------------------------------------------------------------


def published_version(settings: Settings, client) -> dict[str, Any] | None:
    """Metadata of the version the pointer names under ``settings.redis.prefix``, or None."""
    from twotower import redis_keys

    current = client.hget(redis_keys.pointer(settings.redis.prefix), "current")
    if not current:
        return None
    raw = client.get(redis_keys.version_meta(settings.redis.prefix, current.decode()))
    return json.loads(raw) if raw else None


def ensure_movielens(settings: Settings, client) -> dict[str, Any]:
    """The published version's metadata; runs the main job (ingest + nightly + publish) if none."""
    meta = published_version(settings, client)
    if meta is None:
        from jobs.main import run_main

        log.info("nothing published under prefix %r: running the main job first (make run)", settings.redis.prefix)
        run_main(settings)
        meta = published_version(settings, client)
        if meta is None:
            raise RuntimeError("the main job published no version (quality gate?): cannot benchmark serving")
    return meta


def vocab_users(artifact_dir: Path) -> list[str]:
    import pyarrow.parquet as pq

    return pq.read_table(Path(artifact_dir) / "vocab_users.parquet", columns=["user_id"])["user_id"].to_pylist()


# --- the synthetic 1M-item version ---------------------------------------------------------------


def synthetic_item_vectors(n: int, d: int, seed: int) -> np.ndarray:
    """``n`` unit vectors with the low intrinsic dimension of learned embeddings: a random
    rank-``SYNTHETIC_RANK`` map of Gaussian factors plus isotropic noise, generated in chunks."""
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(SYNTHETIC_RANK, d)).astype(np.float32)
    out = np.empty((n, d), dtype=np.float32)
    for start in range(0, n, 200_000):
        stop = min(n, start + 200_000)
        x = rng.normal(size=(stop - start, SYNTHETIC_RANK)).astype(np.float32) @ basis
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        x += rng.normal(0.0, SYNTHETIC_NOISE / np.sqrt(d), size=x.shape).astype(np.float32)
        out[start:stop] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def build_large_index(vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, target: float, seed: int):
    """The IVF-PQ structure jobs.index_params picks for this corpus, trained on a sample.

    Why not jobs.index.build_tuned_index: it trains k-means on every vector (faiss samples 256
    per list: all 1M here) for 25 iterations, which takes well over half an hour on a shared
    2-core CPU. Here the coarse quantizer trains on 39 points per list and both k-means runs
    stop after TRAIN_NITER iterations; the served structure (nlist, M, nbits) is the same. nprobe
    follows jobs.index's schedule and stops at the recall target or when doubling it gains less
    than RECALL_PLATEAU. Returns (index, plan, nprobe, recall, trace, seconds per phase).
    """
    import faiss

    from jobs.index import RECALL_K, exact_topk, recall_at_k, set_nprobe
    from jobs.index_params import GPU_MAX_K, MIN_POINTS_PER_CENTROID, nprobe_schedule, plan_candidates

    n, d = vectors.shape
    plan = plan_candidates(n, d)[0]
    phases: dict[str, float] = {}
    t = time.time()
    index = faiss.index_factory(d, plan.factory, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.extract_index_ivf(index)
    ivf.cp.niter, ivf.cp.seed = TRAIN_NITER, seed
    if plan.type == "IVF-PQ":
        pq = faiss.downcast_index(ivf).pq
        pq.cp.niter, pq.cp.seed, pq.cp.max_points_per_centroid = TRAIN_NITER, seed, PQ_POINTS_PER_CENTROID
    rng = np.random.default_rng(seed)
    sample = vectors[np.sort(rng.choice(n, size=min(n, MIN_POINTS_PER_CENTROID * plan.nlist), replace=False))]
    log.info("synthetic index: training %s on %d of %d vectors", plan.factory, len(sample), n)
    index.train(sample)
    phases["train"] = round(time.time() - t, 3)
    t = time.time()
    index.add_with_ids(vectors, ids)
    phases["add"] = round(time.time() - t, 3)
    t = time.time()
    exact = exact_topk(vectors, ids, queries, RECALL_K)
    phases["exact_neighbours"] = round(time.time() - t, 3)
    t = time.time()
    trace: list[tuple[int, float]] = []
    chosen = (0, 0.0)
    for nprobe in nprobe_schedule(plan.nlist, GPU_MAX_K):
        set_nprobe(index, nprobe)
        _, got = index.search(queries, RECALL_K)
        trace.append((nprobe, recall_at_k(got, exact)))
        log.info("synthetic index: nprobe=%d of %d lists gives recall@%d %.4f", nprobe, plan.nlist, RECALL_K, trace[-1][1])
        if len(trace) > 1 and trace[-1][1] < target and trace[-1][1] - trace[-2][1] < RECALL_PLATEAU:
            chosen = trace[-2]  # the codes, not the probing, limit recall now: probing more only costs time
            break
        chosen = trace[-1]
        if chosen[1] >= target:
            break
    nprobe, recall = chosen
    set_nprobe(index, nprobe)
    phases["tune_nprobe"] = round(time.time() - t, 3)
    return index, plan, nprobe, recall, trace, phases


def build_synthetic_version(settings: Settings, base_meta: dict[str, Any], n_items: int, client, prefix: str) -> dict[str, Any]:
    """Write ``artifacts/bench-<n>items/`` and publish it under ``prefix``; returns build facts."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from jobs.index import noisy_item_queries, write_index_atomic, write_json_atomic
    from models.towers import build_from_config
    from twotower import redis_keys
    from twotower.contracts import ARTIFACT_FILES

    base = Path(base_meta["artifact_dir"])
    version = f"bench-{n_items}items"
    art = settings.paths.artifacts_dir / version
    shutil.rmtree(art, ignore_errors=True)
    art.mkdir(parents=True)
    t0 = time.time()

    # model: the trained towers, item-ID table grown to n_items rows (the user tower reads
    # history items through it; rows past the real corpus are never in a history)
    config = json.loads((base / ARTIFACT_FILES["config"]).read_text())
    state = torch.load(base / ARTIFACT_FILES["model"], map_location="cpu", weights_only=True)
    real_items = config["n_items"]
    config["n_items"] = n_items
    model = build_from_config(config)
    grown = model.state_dict()
    for name, tensor in state.items():
        if name == "item_id_embedding.weight":
            grown[name][: real_items + 1] = tensor
        else:
            grown[name] = tensor
    torch.save(grown, art / ARTIFACT_FILES["model"])
    (art / ARTIFACT_FILES["config"]).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name in ("vocab_users", "users"):
        shutil.copyfile(base / ARTIFACT_FILES[name], art / ARTIFACT_FILES[name])
    idx = pa.array(np.arange(1, n_items + 1, dtype=np.int32))
    ids = pa.array([f"syn{i}" for i in range(1, n_items + 1)])
    pq.write_table(pa.table({"item_id": ids, "idx": idx}), art / ARTIFACT_FILES["vocab_items"])
    pq.write_table(pa.table({"item_idx": idx, "item_id": ids, "attrs": pa.array([[]] * n_items, pa.list_(pa.int32()))}),
                   art / ARTIFACT_FILES["items"])  # fmt: skip
    log.info("synthetic %s: model and tables written in %.1f s", version, time.time() - t0)

    # index: the structure jobs.index_params picks for n_items, nprobe tuned against exact search
    t1 = time.time()
    vectors = synthetic_item_vectors(n_items, config["model"]["dim"], seed=11)
    queries = noisy_item_queries(vectors, SYNTHETIC_QUERIES, seed=12)
    index, plan, nprobe, recall, trace, phases = build_large_index(
        vectors, np.arange(1, n_items + 1, dtype=np.int64), queries, settings.index.target_recall, settings.index.seed
    )
    build_s = time.time() - t1
    del vectors
    meta = {
        "type": plan.type, "factory": plan.factory, "metric": "inner_product", "nlist": plan.nlist, "m": plan.m,
        "nbits": plan.nbits, "nprobe": nprobe, "ann_recall_at_100": round(recall, 6), "target_recall": settings.index.target_recall,
        "n_items": n_items, "dim": config["model"]["dim"], "device": "cpu", "build_seconds": round(build_s, 3),
        "phase_seconds": phases, "fallback": plan.fallback,
        "queries": f"synthetic item vectors plus Gaussian noise ({SYNTHETIC_QUERIES})",
        "tuning": [{"nprobe": p, "recall_at_100": round(r, 6)} for p, r in trace],
    }  # fmt: skip
    write_index_atomic(index, art / ARTIFACT_FILES["index"])
    write_json_atomic(art / ARTIFACT_FILES["index_meta"], meta)
    del index
    log.info("synthetic %s: %s nprobe=%d recall@100=%.4f built in %.1f s", version, plan.factory, nprobe, recall, build_s)

    # Redis: the base version's user rows under the new version, metadata, then the pointer
    src = base_meta["version"]
    pipe = client.pipeline(transaction=False)
    for uid in vocab_users(base):
        row = client.hget(redis_keys.user_row(settings.redis.prefix, src, uid), "e")
        if row is not None:
            pipe.hset(redis_keys.user_row(prefix, version, uid), mapping={"e": row, "w": -1, "n": 0})
    pipe.execute()
    now_ms = int(time.time() * 1000)
    client.set(redis_keys.version_meta(prefix, version), json.dumps({
        "version": version, "artifact_dir": str(art), "trained_at": base_meta.get("trained_at"),
        "published_at_ms": now_ms, "index": {k: v for k, v in meta.items() if k != "tuning"}, "n_items": n_items,
    }))  # fmt: skip
    client.hset(redis_keys.pointer(prefix), mapping={"current": version, "switched_at_ms": now_ms})
    return {"version": version, "index": meta, "build_seconds_total": round(time.time() - t0, 3)}


def drop_prefix(client, prefix: str) -> None:
    for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        client.delete(key)


# --- entry point ---------------------------------------------------------------------------------


def run(settings: Settings, n_items: int = 1_000_000, n_requests: int = 2000, synthetic: bool = True,
        out: Path | None = OUT, command: str = "") -> dict[str, Any]:  # fmt: skip
    """Measure both corpora; returns (and writes to ``out``) the results dict."""
    from jobs.redis_conn import redis_client

    client = redis_client(settings)
    logs = settings.paths.state_dir / "logs"
    result: dict[str, Any] = {
        "benchmark": "serving_latency",
        "command": command or "python -m benchmarks.serving_latency",
        "machine": machine_info(),
        "env_overrides": {k: v for k, v in sorted(os.environ.items()) if k.startswith("TT_") and "PASSWORD" not in k},
        "protocol": f"sequential GET /recall/<user>?k={K} from one client over localhost HTTP to a fresh server "
                    f"process ({int(COLD_FRACTION * 100)}% cold-start ids); client_ms includes HTTP, server_ms is "
                    f"Redis reads + user tower + index search; compute threads {settings.serving.compute_threads}",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "corpora": {},
    }  # fmt: skip
    try:
        meta = ensure_movielens(settings, client)
        users = vocab_users(Path(meta["artifact_dir"]))
        log.info("movielens: version %s, %d users, %s items", meta["version"], len(users), meta.get("n_items"))
        with ServerProcess(settings, settings.redis.prefix, logs / "bench_serving_movielens.log") as srv:
            m = measure(srv.url, users, n_requests)
        result["corpora"]["movielens"] = {"version": meta["version"], "n_items": meta.get("n_items"),
                                          "index": meta.get("index"), **m}  # fmt: skip
        log.info("movielens: p50 %.2f ms, p99 %.2f ms", m["client_ms"]["p50"], m["client_ms"]["p99"])

        if synthetic:
            prefix = f"{settings.redis.prefix}-bench1m"
            drop_prefix(client, prefix)
            try:
                facts = build_synthetic_version(settings, meta, n_items, client, prefix)
                with ServerProcess(settings, prefix, logs / "bench_serving_synthetic.log") as srv:
                    m = measure(srv.url, users, max(200, n_requests // 2), seed=1)
                result["corpora"]["synthetic"] = {"n_items": n_items, **facts, **m}
                log.info("synthetic %d items: p50 %.2f ms, p99 %.2f ms", n_items, m["client_ms"]["p50"], m["client_ms"]["p99"])
            finally:
                drop_prefix(client, prefix)
                shutil.rmtree(settings.paths.artifacts_dir / f"bench-{n_items}items", ignore_errors=True)
    finally:
        client.close()
    result["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, sort_keys=True, default=str) + "\n")
        log.info("results written to %s", out)
    return result


def main(argv: list[str] | None = None) -> int:
    from twotower.config import load_settings
    from twotower.logs import setup_logging

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=1_000_000, help="synthetic corpus size")
    parser.add_argument("--requests", type=int, default=2000, help="measured requests on MovieLens (half on synthetic)")
    parser.add_argument("--skip-synthetic", action="store_true", help="measure the MovieLens version only")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    setup_logging()
    logging.getLogger("httpx").setLevel(logging.WARNING)
    command = "python -m benchmarks.serving_latency " + " ".join(argv if argv is not None else sys.argv[1:])
    res = run(load_settings(), args.items, args.requests, not args.skip_synthetic, args.out, command.strip())
    print(json.dumps({k: {kk: v.get(kk) for kk in ("n_items", "client_ms", "server_ms", "errors")} for k, v in res["corpora"].items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

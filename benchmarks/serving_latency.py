"""/recall latency on CPU, through the real HTTP server, for two corpora.

    movielens   the version published under ``settings.redis.prefix`` (``make run`` publishes
                MovieLens-100K: 1,682 items); when nothing is published, the main job runs first
    synthetic   1,000,000 clustered items in the IVF-PQ index that benchmarks.index_scale builds
                with the product's builder (jobs.index.build_tuned_index: nlist, M and nprobe from
                the corpus size, nprobe tuned on sampled queries). It is cached under
                benchmarks/out/cache by spec, so ``make bench`` builds one 1M index, not two;
                it is built here only when index_scale has not run with the same spec.

The synthetic version follows the artifact and Redis contracts: the MovieLens version's trained
user tower and user-ID rows, an item-ID table grown to 1M rows, that index (no model could be
trained on 1M items here), and a pointer of its own under ``<prefix>-bench1m``. The user tower
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

from benchmarks.limits_common import fmt, header
from twotower.config import PROJECT_ROOT, Settings

log = logging.getLogger("benchmarks.serving_latency")

OUT = PROJECT_ROOT / "benchmarks" / "out" / "serving_latency.json"
K = 100
COLD_FRACTION = 0.1


# --- machine -------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """CPU, cores, memory, load and library versions: enough to compare two runs honestly
    (beside the common ``machine`` field of every benchmark result)."""
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


def build_synthetic_version(settings: Settings, base_meta: dict[str, Any], n_items: int, client, prefix: str) -> dict[str, Any]:
    """Write ``artifacts/bench-<n>items/`` and publish it under ``prefix``; returns build facts."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from benchmarks.index_scale import ensure_index
    from jobs.index import write_json_atomic
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

    # index: the 1M-item index benchmarks.index_scale builds with the product's builder (cached
    # under benchmarks/out/cache by spec; built here only when index_scale has not run)
    t1 = time.time()
    cached, meta, built_now = ensure_index(n_items, config["model"]["dim"], settings.index)
    shutil.copyfile(cached / "index.faiss", art / ARTIFACT_FILES["index"])
    meta = {**meta, "source": f"{'built now' if built_now else 'reused'} by benchmarks.index_scale.ensure_index ({cached})"}
    write_json_atomic(art / ARTIFACT_FILES["index_meta"], meta)
    log.info("synthetic %s: %s nprobe=%d recall@100=%.4f, index %s in %.1f s", version, meta["factory"], meta["nprobe"],
             meta["ann_recall_at_100"], "built" if built_now else "reused", time.time() - t1)  # fmt: skip

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


# --- report --------------------------------------------------------------------------------------


def render(result: dict[str, Any]) -> list[str]:
    """Markdown lines of the /recall latency section: one row per corpus."""
    lines = [
        f"Protocol: {result['protocol']}.",
        "",
        "| corpus | items | index | requests (errors) | client p50 / p90 / p99 (ms) | server p50 / p99 (ms) |",
        "|---|---|---|---|---|---|",
    ]
    for name, c in result["corpora"].items():
        idx = c.get("index") or {}
        desc = f"{idx.get('factory', idx.get('type', '-'))}, nprobe {idx.get('nprobe', '-')}, recall@100 {idx.get('ann_recall_at_100', '-')}"
        cm, sm = c["client_ms"], c["server_ms"]
        lines.append(f"| {name} | {fmt(c.get('n_items'))} | {desc} | {fmt(c['requests'])} ({c['errors']}) | "
                     f"{cm['p50']} / {cm['p90']} / {cm['p99']} | {sm['p50']} / {sm['p99']} |")  # fmt: skip
    synthetic = result["corpora"].get("synthetic")
    if synthetic is None:
        lines += ["", "The 1M-item corpus was not measured in this run (--skip-synthetic)."]
    else:
        source = (synthetic.get("index") or {}).get("source", "")
        lines += ["", f"1M-item index: {source}."]
    return lines + [""]


# --- entry point ---------------------------------------------------------------------------------


def run(settings: Settings, n_items: int = 1_000_000, n_requests: int = 2000, synthetic: bool = True,
        out: Path | None = OUT, command: str = "") -> dict[str, Any]:  # fmt: skip
    """Measure both corpora; returns (and writes to ``out``) the results dict."""
    from jobs.redis_conn import redis_client

    client = redis_client(settings)
    logs = settings.paths.state_dir / "logs"
    result: dict[str, Any] = {
        **header("serving_latency"),
        "command": command or "python -m benchmarks.serving_latency",
        "machine_details": machine_info(),
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

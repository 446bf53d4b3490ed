"""A model version of a chosen size, written straight in the product's artifact layout, for the
benchmarks that need a published version but not a trained one (consumer memory, freshness).

Why not the nightly job: training a model on 1M users is hours of CPU on this machine, and what
these benchmarks measure (the consumer's memory, its update and write latency) depends on the
sizes of the tables, not on what the weights learned. So the version here is the product's
TwoTower (models.towers) at the requested sizes with its seeded initial weights, plus:

    artifacts/<v>/  model.pt, config.json, item_embeddings.npy (the item tower over the corpus),
                    vocab_users/vocab_items/users/items.parquet (ids ``u<k>`` / ``i<k>``, a few
                    attribute tokens each), manifest.json, and a real index built by
                    jobs.index.build_index (publish records its metadata; no recall floor, since
                    untrained vectors have no quality to gate)
    prepared/dt=<D>/user_history.parquet   empty: histories fill from the stream

It is published with jobs.publish.publish_version (every vocabulary user's row written), or,
with ``write_rows=False``, registered without rows (metadata + pointer, the same Redis writes
publish ends with): the consumer starts a vocabulary user without a row from the model's row
(streaming.hour), so the consumer's work is the same, and 1M row writes are skipped.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from twotower.config import Settings
from twotower.contracts import ARTIFACT_FILES, day_start_ms, prepared_partition

log = logging.getLogger("benchmarks.bench_version")

USER_SEGMENTS = 5
ITEM_CLUSTERS = 20
HISTORY_SCHEMA = pa.schema([("user_idx", pa.int32()), ("hist", pa.list_(pa.int32())), ("hist_ts", pa.list_(pa.int64())),
                            ("hist_event_ids", pa.list_(pa.string()))])  # fmt: skip


def user_id(k: int) -> str:
    return f"u{k}"


def item_id(k: int) -> str:
    return f"i{k}"


def _entity_tables(n: int, prefix: str, first_token: int, n_tokens: int) -> tuple[pa.Table, pa.Table]:
    """(vocab table [<kind>_id, idx], attribute table [<kind>_idx, <kind>_id, attrs]) for ids 1..n."""
    idx = np.arange(1, n + 1, dtype=np.int32)
    ids = pa.array(np.char.add(prefix, idx.astype(str)).tolist(), pa.string())
    attrs = pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32)),
                                     pa.array(first_token + idx % n_tokens, pa.int32()))  # fmt: skip
    kind = "user" if prefix == "u" else "item"
    return (pa.table({f"{kind}_id": ids, "idx": pa.array(idx)}),
            pa.table({f"{kind}_idx": pa.array(idx), f"{kind}_id": ids, "attrs": attrs}))  # fmt: skip


def write_version(settings: Settings, n_users: int, n_items: int, cutoff_day: dt.date, seed: int = 0) -> Path:
    """Write the artifact directory and prepared partition of a version; returns the artifact dir."""
    from jobs.index import build_index
    from models.towers import TwoTower, corpus_item_vectors, model_config_dict

    version = f"{cutoff_day.strftime('%Y%m%d')}-bench-{n_users}u-{n_items}i"
    art = settings.paths.artifacts_dir / version
    art.mkdir(parents=True)
    prepared = prepared_partition(settings.paths.prepared_dir, cutoff_day)
    prepared.mkdir(parents=True)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    n_attrs = USER_SEGMENTS + ITEM_CLUSTERS
    model = TwoTower(settings.model, n_users, n_items, n_attrs, settings.prepare.history_len)
    torch.save(model.state_dict(), art / ARTIFACT_FILES["model"])
    (art / ARTIFACT_FILES["config"]).write_text(json.dumps(model_config_dict(model), indent=2, sort_keys=True) + "\n")
    vocab_users, users = _entity_tables(n_users, "u", 1, USER_SEGMENTS)
    vocab_items, items = _entity_tables(n_items, "i", 1 + USER_SEGMENTS, ITEM_CLUSTERS)
    for name, table in (("vocab_users", vocab_users), ("users", users), ("vocab_items", vocab_items), ("items", items)):
        pq.write_table(table, art / ARTIFACT_FILES[name])
    item_attrs = torch.zeros(n_items + 1, 1, dtype=torch.long)
    item_attrs[1:, 0] = torch.from_numpy(1 + USER_SEGMENTS + np.arange(1, n_items + 1) % ITEM_CLUSTERS)
    np.save(art / ARTIFACT_FILES["item_embeddings"], corpus_item_vectors(model, item_attrs).numpy().astype(np.float32))
    del model
    cutoff_ms = day_start_ms(cutoff_day + dt.timedelta(days=1))
    manifest = {"version": version, "logical_date": cutoff_day.isoformat(), "data_cutoff_ms": cutoff_ms,
                "prepared_dir": str(prepared), "trained_at": time.time(),
                "note": "benchmark version: product TwoTower at seeded initial weights, not trained",
                "prepared_manifest": {"logical_date": cutoff_day.isoformat(), "data_cutoff_ms": cutoff_ms,
                                      "history_len": settings.prepare.history_len, "n_users": n_users, "n_items": n_items}}  # fmt: skip
    (art / ARTIFACT_FILES["manifest"]).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    pq.write_table(HISTORY_SCHEMA.empty_table(), prepared / "user_history.parquet")
    log.info("benchmark version %s: %d users, %d items written in %.1f s; building its index", version, n_users, n_items, time.perf_counter() - t0)
    # untrained item vectors have no recall to gate on (the floor is a publish-quality rule):
    # the index is built by the product's builder, whatever recall it reaches is recorded
    build_index(settings.replace("index", recall_floor=0.0), art, None)
    return art


def register_version(settings: Settings, client, artifact_dir: Path) -> None:
    """Version metadata, versions entry and pointer, without user rows (see the module docstring)."""
    from jobs.publish import version_facts, version_metadata
    from twotower import redis_keys as rk

    facts = version_facts(settings, artifact_dir)
    config = json.loads((artifact_dir / ARTIFACT_FILES["config"]).read_text())
    now_ms = int(time.time() * 1000)
    meta = version_metadata(facts, config["n_users"], config["model"]["id_dim"], now_ms)
    client.set(rk.version_meta(settings.redis.prefix, facts.version), json.dumps(meta, sort_keys=True))
    client.zadd(rk.versions(settings.redis.prefix), {facts.version: now_ms})
    client.hset(rk.pointer(settings.redis.prefix), mapping={"current": facts.version, "current_cutoff_ms": facts.data_cutoff_ms,
                                                            "switched_at_ms": now_ms})  # fmt: skip


def publish_bench_version(settings: Settings, n_users: int, n_items: int, cutoff_day: dt.date, write_rows: bool = True,
                          seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """Write, index and publish (or register) a benchmark version; returns what was done and how long it took."""
    from jobs.publish import publish_version
    from jobs.redis_conn import redis_client

    t0 = time.perf_counter()
    art = write_version(settings, n_users, n_items, cutoff_day, seed)
    built_s = time.perf_counter() - t0
    client = redis_client(settings)
    try:
        t1 = time.perf_counter()
        if write_rows:
            publish_version(settings, art, client=client)
        else:
            register_version(settings, client, art)
        publish_s = time.perf_counter() - t1
    finally:
        client.close()
    return {"version": art.name, "artifact_dir": str(art), "n_users": n_users, "n_items": n_items, "rows_published": write_rows,
            "build_seconds": round(built_s, 2), "publish_seconds": round(publish_s, 2),
            "data_cutoff_ms": day_start_ms(cutoff_day + dt.timedelta(days=1)),
            "model": dataclasses.asdict(settings.model)}  # fmt: skip

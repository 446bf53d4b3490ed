"""Fixtures and helpers of the streaming tests: a private Tansu broker, a tiny model version
written as an artifact and published to Redis the way jobs.publish lays it out, and a seeded
event stream (derived at test time; no data is committed).

The broker is the same binary ``make infra-up`` runs, started on a free port by the test
session and stopped at its end, so tests never touch a developer's broker or topics.
"""

from __future__ import annotations

import json
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from streaming.events import Event, encode_event
from twotower import redis_keys as rk
from twotower.config import ModelConfig, Settings
from twotower.contracts import ARTIFACT_FILES

SESSION_TIMEOUT_MS = 1500  # group joins take about this long on Tansu; short keeps tests fast
HOUR = 3_600_000
BASE_MS = 1_709_251_200_000  # 2024-03-01T00:00Z


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory):
    """A Tansu broker for this test session: yields its bootstrap address."""
    from infra.local import start_broker, stop_broker

    run_dir = tmp_path_factory.mktemp("tansu")
    port = _free_port()
    broker = start_broker("127.0.0.1", port, run_dir)
    yield f"127.0.0.1:{port}"
    stop_broker(broker, run_dir)


@pytest.fixture
def kafka_settings(settings: Settings, kafka_broker: str) -> Settings:
    """``settings`` pointed at the session broker with this test's own topics and groups."""
    from infra.kafka_topics import ensure_topics, project_topics
    from streaming.clients import make_admin

    tag = uuid.uuid4().hex[:8]
    s = settings.replace(
        "kafka",
        bootstrap_servers=kafka_broker,
        topic=f"t-{tag}",
        dead_letter_topic=f"t-{tag}.dlq",
        group_id=f"g-{tag}",
        archiver_group_id=f"a-{tag}",
        session_timeout_ms=SESSION_TIMEOUT_MS,
    )
    admin = make_admin(s.kafka)
    try:
        ensure_topics(admin, project_topics(s.kafka))
    finally:
        admin.close()
    return s


def partition_of(user_id: str, partitions: int) -> int:
    """The partition kafka-python's default partitioner picks for a user key."""
    from kafka.partitioner.default import murmur2

    return (murmur2(user_id.encode()) & 0x7FFFFFFF) % partitions


# --- a tiny model version -----------------------------------------------------------------


@dataclass(frozen=True)
class TinyVersion:
    version: str
    artifact_dir: Path
    data_cutoff_ms: int
    users: list[str]
    items: list[str]


def write_tiny_artifact(root: Path, version: str, data_cutoff_ms: int, n_users: int = 50, n_items: int = 30,
                        history_len: int = 10, seed: int = 0) -> TinyVersion:
    """An untrained TwoTower (real models.towers) saved as a complete artifact directory.

    Users ``u1..u{n_users}``, items ``i1..i{n_items}``; each user has one attribute
    (``age=young``/``age=old``) and each item two (a group and a genre).
    """
    from models.features import load_feature_tables
    from models.towers import TwoTower, corpus_item_vectors, model_config_dict

    out = root / version
    out.mkdir(parents=True)
    torch.manual_seed(seed)
    cfg = ModelConfig(dim=16, id_dim=8, hidden=32, dropout=0.0)
    tokens = ["age=young", "age=old", "group=0", "group=1", "group=2", "genre=a", "genre=b"]
    model = TwoTower(cfg, n_users, n_items, len(tokens), history_len).eval()
    users = [f"u{u}" for u in range(1, n_users + 1)]
    items = [f"i{i}" for i in range(1, n_items + 1)]
    idx_u = pa.array(range(1, n_users + 1), pa.int32())
    idx_i = pa.array(range(1, n_items + 1), pa.int32())
    pq.write_table(pa.table({"user_id": users, "idx": idx_u}), out / ARTIFACT_FILES["vocab_users"])
    pq.write_table(pa.table({"item_id": items, "idx": idx_i}), out / ARTIFACT_FILES["vocab_items"])
    pq.write_table(pa.table({"user_idx": idx_u, "user_id": users,
                             "attrs": pa.array([[1 + u % 2] for u in range(1, n_users + 1)], pa.list_(pa.int32()))}),
                   out / ARTIFACT_FILES["users"])
    pq.write_table(pa.table({"item_idx": idx_i, "item_id": items,
                             "attrs": pa.array([[3 + i % 3, 6 + i % 2] for i in range(1, n_items + 1)], pa.list_(pa.int32()))}),
                   out / ARTIFACT_FILES["items"])
    tables = load_feature_tables(out, n_users, n_items)
    np.save(out / ARTIFACT_FILES["item_embeddings"], corpus_item_vectors(model, tables.item_attrs).numpy().astype(np.float32))
    torch.save(model.state_dict(), out / ARTIFACT_FILES["model"])
    (out / ARTIFACT_FILES["config"]).write_text(json.dumps(model_config_dict(model)))
    (out / ARTIFACT_FILES["manifest"]).write_text(json.dumps({"version": version, "data_cutoff_ms": data_cutoff_ms}))
    return TinyVersion(version, out, data_cutoff_ms, users, items)


def publish_tiny(client, prefix: str, tv: TinyVersion) -> None:
    """Write the version's rows (w=-1) and metadata, then switch the pointer (like jobs.publish)."""
    from models.towers import load_model
    from streaming.state import encode_row

    weight = load_model(tv.artifact_dir).user_id_embedding.weight.detach().numpy()
    pipe = client.pipeline(transaction=False)
    for i, uid in enumerate(tv.users, start=1):
        pipe.hset(rk.user_row(prefix, tv.version, uid), mapping={"e": encode_row(weight[i]), "w": -1, "n": 0})
    meta = {"version": tv.version, "artifact_dir": str(tv.artifact_dir), "data_cutoff_ms": tv.data_cutoff_ms}
    pipe.set(rk.version_meta(prefix, tv.version), json.dumps(meta))
    pipe.execute()
    current = client.hget(rk.pointer(prefix), "current")
    mapping = {"current": tv.version, "switched_at_ms": 0}
    if current:
        mapping["previous"] = current
    client.hset(rk.pointer(prefix), mapping=mapping)


# --- a seeded stream ------------------------------------------------------------------------


@dataclass
class Record:
    """One record to produce: key, raw value, record timestamp."""

    key: bytes | None
    value: bytes
    ts: int


def make_stream(n_hours: int = 8, n_events: int = 500, seed: int = 7, partitions: int = 4,
                known_users: int = 50, new_users: int = 20, known_items: int = 30, unknown_items: int = 5) -> list[Record]:
    """Events over ``n_hours`` hours from BASE_MS, produced roughly in time order with up to
    25 min of delay (the default lateness is 10 min, so some arrive late), plus duplicates,
    malformed records, a few events before BASE_MS, and one tail event per partition two hours
    after the last hour so the hours close."""
    rng = np.random.default_rng(seed)
    users = [f"u{u}" for u in range(1, known_users + new_users + 1)]
    items = [f"i{i}" for i in range(1, known_items + unknown_items + 1)]
    events = []
    for k in range(n_events):
        ts = BASE_MS + int(rng.integers(-HOUR // 2, n_hours * HOUR))
        user = users[int(rng.integers(len(users)))]
        item = items[int(rng.integers(len(items)))]
        events.append(Event(f"e{k:05d}", user, item, "click", ts, float(rng.choice([1.0, 1.0, 2.0, 0.5]))))
    arrival = [e.ts + int(rng.integers(0, 25 * 60_000)) for e in events]
    order = np.argsort(np.array(arrival), kind="stable")
    records = [Record(events[i].user_id.encode(), encode_event(events[i]), arrival[i]) for i in order]
    for j in rng.choice(len(records), size=10, replace=False):  # re-sent duplicates, later
        records.insert(min(len(records), int(j) + int(rng.integers(5, 40))), records[int(j)])
    bad = [
        Record(b"u1", b"not json", BASE_MS),
        Record(b"u2", b'{"event_id":"x1","user_id":"u2","item_id":"i1","event_type":"click","ts":"soon"}', BASE_MS),
        Record(b"u3", b'{"event_id":"x2","user_id":"u3","item_id":"i1","event_type":"click"}', BASE_MS),
        Record(b"u9", b'{"event_id":"x3","user_id":"u4","item_id":"i1","event_type":"click","ts":1709251300000}', BASE_MS + HOUR),
        Record(b"u5", b'{"event_id":"x4","user_id":"u5","item_id":"i1","event_type":"click","ts":1709251300000,"weight":-1}', BASE_MS + HOUR),
        Record(b"u6", b"[1,2,3]", BASE_MS),
    ]
    for n, rec in enumerate(bad):
        records.insert(len(records) * (n + 1) // (len(bad) + 1), rec)
    tail_ts = BASE_MS + (n_hours + 2) * HOUR
    covered = {}
    for u in users:
        covered.setdefault(partition_of(u, partitions), u)
    assert len(covered) == partitions, "the user set must reach every partition"
    for p, u in sorted(covered.items()):
        records.append(Record(u.encode(), encode_event(Event(f"tail-{p}", u, "i1", "click", tail_ts, 1.0)), tail_ts))
    return records


def produce(s: Settings, records: list[Record], topic: str | None = None) -> None:
    from streaming.clients import make_producer

    producer = make_producer(s.kafka)
    for rec in records:
        producer.send(topic or s.kafka.topic, key=rec.key, value=rec.value, timestamp_ms=rec.ts)
    producer.flush()
    producer.close()


def redis_snapshot(client, prefix: str, version: str) -> dict:
    """Everything the consumer's effect consists of, for comparing two runs: rows (decoded),
    histories (members and scores), per-hour counters, applied hours, checkpoints, dead count.
    Keys are given without the prefix, so runs on two prefixes compare directly."""
    from streaming.state import decode_row

    snap: dict = {"rows": {}, "hists": {}, "windows": {}, "other": {}}
    for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        k = key.decode()[len(prefix) + 1:]
        if k.startswith(f"row:{version}:"):
            h = client.hgetall(key)
            snap["rows"][k] = (decode_row(h[b"e"]), int(h[b"w"]), int(h[b"n"]))
        elif k.startswith("hist:"):
            snap["hists"][k] = client.zrange(key, 0, -1, withscores=True)
        elif k.startswith(f"incr:win:{version}:"):
            snap["windows"][k] = client.hgetall(key)
        elif k in (f"incr:windows:{version}", f"incr:ckpt:{version}", "incr:dead"):
            t = client.type(key)
            snap["other"][k] = client.zrange(key, 0, -1, withscores=True) if t == b"zset" else client.hgetall(key)
    return snap

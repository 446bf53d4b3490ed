"""Redis write rate: the physical limit of the incremental path's publish step.

    python -m benchmarks.redis_rate [--users 100000] [--batch 1000] [--events-per-user 3]

The incremental consumer ends every closed hour by writing, per touched user, a new user-ID row
and the hour's events into the user's history. This measures, against the real Redis of the
settings, with the key layout and value sizes of streaming/state.py (twotower.redis_keys):

  * **pipelined plain writes**: per user ``HSET <p>:row:<v>:{u:<id>} e <id_dim float32> w <hour>``,
    ``HINCRBY ... n <events>`` and ``ZADD <p>:hist:{u:<id>} <ts> <event_id\\titem_id>`` for each of
    the user's events, sent in pipelines of ``--batch`` users (no transaction). This is the
    fastest a client can move the same bytes: the ceiling of the path.
  * **the product's own write**: ``StreamState.apply_users`` — one Lua script per batch of users (row only
    if newer, HINCRBY, ZADD NX, history trim), pipelined per batch the same way.

Both on fresh keys of the same shape, one client, one thread, over the same connection settings
the consumer uses. Reported: user rows/s and the events/s equivalent (rows/s x events per user;
the stream's events are spread over users, so one row carries ``--events-per-user`` events on
average). Everything is written under a unique prefix that is deleted afterwards.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

import numpy as np

from benchmarks.limits_common import cli, drop_prefix, fmt, header
from twotower.config import Settings, load_settings

log = logging.getLogger("benchmarks.redis_rate")

NAME = "redis_rate"
VERSION = "bench-rate"
HOUR_MS = 1_706_572_800_000  # an hour start (2024-01-30T00:00Z); any hour works, the key shape is what matters


def user_batches(n_users: int, batch: int, events_per_user: int, id_dim: int, seed: int = 0):
    """Lists of (user_id, row float32 [id_dim], [(ts, member)]) per batch: the data of each write,
    built before timing so that only Redis and the client are measured."""
    from twotower import redis_keys as rk

    rng = np.random.default_rng(seed)
    rows = rng.normal(0, 0.1, size=(n_users, id_dim)).astype(np.float32)
    out = []
    for start in range(0, n_users, batch):
        chunk = []
        for u in range(start, min(n_users, start + batch)):
            hist = [(HOUR_MS + 1000 * (u % 3600) + j, rk.history_member(f"ev-{u}-{j}", f"i{(u * 7 + j) % 50_000}"))
                    for j in range(events_per_user)]  # fmt: skip
            chunk.append((f"bench-user-{u}", rows[u], hist))
        out.append(chunk)
    return out


def plain_pipelined(client, prefix: str, batches, events_per_user: int) -> float:
    """Seconds to write every batch with plain pipelined HSET/HINCRBY/ZADD."""
    from streaming.state import encode_row
    from twotower import redis_keys as rk

    t0 = time.perf_counter()
    for chunk in batches:
        pipe = client.pipeline(transaction=False)
        for uid, row, hist in chunk:
            key = rk.user_row(prefix, VERSION, uid)
            pipe.hset(key, mapping={"e": encode_row(row), "w": HOUR_MS})
            pipe.hincrby(key, "n", events_per_user)
            pipe.zadd(rk.user_history(prefix, uid), {m: ts for ts, m in hist})
        pipe.execute()
    return time.perf_counter() - t0


def product_script(client, prefix: str, batches, history_len: int, retention_ms: int) -> tuple[float, int]:
    """(seconds, rows written) of StreamState.apply_users over every batch."""
    from streaming.state import StreamState, UserWrite

    state = StreamState(client, prefix)
    writes = [[UserWrite(uid, row, len(hist), hist) for uid, row, hist in chunk] for chunk in batches]
    written = 0
    t0 = time.perf_counter()
    for chunk in writes:
        written += sum(o.applied for o in state.apply_users(VERSION, HOUR_MS, chunk, history_len, retention_ms))
    return time.perf_counter() - t0, written


def key_bytes(client, prefix: str, uid: str) -> dict[str, int | None]:
    """Redis's own memory estimate of one user's row and history keys."""
    from twotower import redis_keys as rk

    try:
        return {"row": client.memory_usage(rk.user_row(prefix, VERSION, uid)), "history": client.memory_usage(rk.user_history(prefix, uid))}
    except Exception:  # noqa: BLE001 - MEMORY USAGE may be disabled on managed Redis; informative only
        return {"row": None, "history": None}


def run(n_users: int = 100_000, batch: int = 1000, events_per_user: int = 3, settings: Settings | None = None,
        argv: list[str] | None = None) -> dict[str, Any]:  # fmt: skip
    """Measure both write paths on fresh keys; everything is deleted afterwards."""
    import uuid

    from jobs.redis_conn import redis_client

    s = settings or load_settings()
    id_dim = s.model.id_dim
    batches = user_batches(n_users, batch, events_per_user, id_dim)
    client = redis_client(s)
    prefixes = {name: f"tt-bench-{NAME}-{name}-{uuid.uuid4().hex[:8]}" for name in ("plain", "script", "warmup")}
    try:
        client.ping()
        # warm-up of both paths (connection, script cache, client code paths), not timed
        plain_pipelined(client, prefixes["warmup"], batches[:1], events_per_user)
        product_script(client, prefixes["warmup"] + "-s", batches[:1], s.prepare.history_len, 0)
        plain_s = plain_pipelined(client, prefixes["plain"], batches, events_per_user)
        sizes = key_bytes(client, prefixes["plain"], "bench-user-0")
        script_s, written = product_script(client, prefixes["script"], batches, s.prepare.history_len,
                                           s.incremental.history_retention_s * 1000)  # fmt: skip
        info = client.info("server")
    finally:
        for prefix in [*prefixes.values(), prefixes["warmup"] + "-s"]:
            drop_prefix(client, prefix)
        client.close()
    if written != n_users:
        raise RuntimeError(f"apply_users wrote {written} rows of {n_users}: the benchmark keys were not fresh")

    def rates(seconds: float) -> dict[str, Any]:
        return {"seconds": round(seconds, 3), "rows_per_s": round(n_users / seconds), "events_per_s": round(n_users * events_per_user / seconds)}

    return {
        **header(NAME, argv),
        "redis": {"url_host": s.redis.url.split("@")[-1], "version": info.get("redis_version")},
        "users": n_users,
        "batch_users": batch,
        "events_per_user": events_per_user,
        "row_bytes": 4 * id_dim,
        "id_dim": id_dim,
        "key_memory_bytes": sizes,
        "plain_pipelined": rates(plain_s),
        "apply_users_lua": rates(script_s),
        "lua_to_plain": round(plain_s / script_s, 3),
    }


def render(result: dict[str, Any]) -> list[str]:
    """Markdown lines of the Redis write-rate section."""
    p, lua = result["plain_pipelined"], result["apply_users_lua"]
    return [
        f"Redis {result['redis']['version']} at "
        f"{result['redis']['url_host']}. {fmt(result['users'])} users, a {result['row_bytes']}-byte row "
        f"({result['id_dim']} float32) + w/n and {result['events_per_user']} history events each, pipelines of "
        f"{fmt(result['batch_users'])} users, one client thread.",
        "",
        "| write path | seconds | user rows/s | events/s equivalent |",
        "|---|---|---|---|",
        f"| pipelined HSET + HINCRBY + ZADD (same keys and sizes as streaming/state.py) | {p['seconds']} | {fmt(p['rows_per_s'])} | {fmt(p['events_per_s'])} |",
        f"| the product's write: StreamState.apply_users (one Lua script per batch of 256 users, pipelined) | {lua['seconds']} | "
        f"{fmt(lua['rows_per_s'])} | {fmt(lua['events_per_s'])} |",
        "",
        f"The product's script runs at {result['lua_to_plain']:.2f} of the plain pipelined rate.",
        "",
    ]


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--users", type=int, default=100_000)
    p.add_argument("--batch", type=int, default=1000, help="users per pipeline")
    p.add_argument("--events-per-user", type=int, default=3)


def main(argv: list[str] | None = None) -> int:
    return cli(NAME, __doc__, add_args, lambda a, argv: run(a.users, a.batch, a.events_per_user, argv=argv), render, argv)


if __name__ == "__main__":
    sys.exit(main())

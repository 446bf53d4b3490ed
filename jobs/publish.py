"""Publish a model version to Redis (DESIGN §3; key layout in twotower.redis_keys).

Order, so that serving never sees half a version:

1. refuse early (nothing written) when the serving version has a newer data cutoff and
   ``force`` is off — a backfill must not silently roll serving back;
2. register the version in ``<p>:versions`` (so a crashed attempt is found and cleaned up);
3. per user, pipelined in batches of ``redis.batch_size`` with progress logs:
   the user-ID row ``<p>:row:<v>:{u:<id>}`` = {e: float32 LE bytes, w: -1, n: 0} (for a user
   without a training example, a copy of the OOV row 0 made by training), written only
   if the row does not exist yet (a re-run after a crash fills the gaps and never overwrites a
   row the incremental updater has already moved), and the history at the data cutoff, added
   to ``<p>:hist:{u:<id>}`` (members ``<event_id>\\t<item_id>`` scored by ts: idempotent) and
   trimmed to the newest L before the cutoff (later events belong to the hourly path);
4. the version metadata ``<p>:version:<v>`` (its presence means "fully written");
5. the pointer switch: one Lua script on the one pointer key (Cluster-safe) that moves
   current -> previous and sets current, and refuses a version whose data cutoff is older than
   the serving one unless forced;
6. deletion of versions beyond ``redis.keep_versions`` (current and previous are always kept):
   SCAN + UNLINK of their rows, then their metadata.

A crash anywhere before step 5 leaves the pointer, and so serving, on the old version;
re-running the publish completes the version. Histories are shared by all versions (they are
facts about users, not model state), so writing them early is harmless.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow.parquet as pq
import redis
import torch

from jobs.index import read_index_meta
from jobs.runs import iso_utc
from twotower import redis_keys
from twotower.config import Settings
from twotower.contracts import ARTIFACT_FILES, parse_day, prepared_partition

log = logging.getLogger(__name__)

USER_ID_TABLE = "user_id_embedding.weight"
NIGHTLY_WINDOW = -1
"""``w`` of a row straight from the nightly model (no incremental window applied yet)."""

ROW_IF_ABSENT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'e', ARGV[1], 'w', ARGV[2], 'n', ARGV[3])
return 1
"""

SWITCH_POINTER = """
local cur = redis.call('HGET', KEYS[1], 'current')
if cur == ARGV[1] then return {0, 'already_current', cur} end
local cur_cut = redis.call('HGET', KEYS[1], 'current_cutoff_ms')
if cur and ARGV[4] ~= '1' and cur_cut and tonumber(ARGV[2]) < tonumber(cur_cut) then
  return {0, 'older_cutoff', cur}
end
redis.call('HSET', KEYS[1], 'current', ARGV[1], 'current_cutoff_ms', ARGV[2], 'switched_at_ms', ARGV[3])
if cur then
  redis.call('HSET', KEYS[1], 'previous', cur, 'previous_cutoff_ms', cur_cut or '-1')
end
return {1, 'switched', cur or ''}
"""
"""KEYS[1] = pointer; ARGV = version, data_cutoff_ms, now_ms, force ('1'/'0').
Returns {switched 0/1, why, the version that was current}."""

ROLLBACK_POINTER = """
local cur = redis.call('HGET', KEYS[1], 'current')
local prev = redis.call('HGET', KEYS[1], 'previous')
if not prev or prev == '' or prev ~= ARGV[1] then return {0, cur or ''} end
local cur_cut = redis.call('HGET', KEYS[1], 'current_cutoff_ms') or '-1'
local prev_cut = redis.call('HGET', KEYS[1], 'previous_cutoff_ms') or '-1'
redis.call('HSET', KEYS[1], 'current', prev, 'current_cutoff_ms', prev_cut, 'previous', cur,
           'previous_cutoff_ms', cur_cut, 'switched_at_ms', ARGV[2])
return {1, cur}
"""
"""KEYS[1] = pointer; ARGV = the previous version seen by the caller, now_ms. Swaps current and
previous only if previous is still that version (so two operators cannot undo each other)."""


@dataclass(frozen=True)
class VersionFacts:
    """What publish needs to know about an artifact directory."""

    version: str
    artifact_dir: Path
    prepared_dir: Path
    logical_date: str
    data_cutoff_ms: int
    trained_at: float | None
    history_len: int
    metrics: dict[str, Any]
    index: dict[str, Any]
    users_without_examples: int | None
    """Users whose row is the OOV row (manifest; None for an artifact trained before it was counted)."""


def ms_iso(ms: int) -> str:
    """``2024-01-31T00:00:00.000Z`` for epoch milliseconds."""
    return iso_utc(ms / 1000)


def version_facts(settings: Settings, artifact_dir: Path, prepared_dir: Path | None = None) -> VersionFacts:
    """Read manifest, metrics and index metadata of a version; the prepared partition is the
    manifest's ``prepared_dir`` if recorded, else ``prepared/dt=<logical date>`` of the settings."""
    artifact_dir = Path(artifact_dir).resolve()
    manifest = json.loads((artifact_dir / ARTIFACT_FILES["manifest"]).read_text())
    version = manifest.get("version") or artifact_dir.name
    if version != artifact_dir.name:
        raise ValueError(f"{artifact_dir}: manifest names version {version!r}, the directory {artifact_dir.name!r}")
    prepared_manifest = manifest.get("prepared_manifest", {})
    logical_date = manifest.get("logical_date") or prepared_manifest["logical_date"]
    cutoff = manifest.get("data_cutoff_ms", prepared_manifest.get("data_cutoff_ms"))
    if cutoff is None:
        raise ValueError(f"{artifact_dir}/manifest.json names no data_cutoff_ms: cannot order versions")
    if prepared_dir is None:
        recorded = manifest.get("prepared_dir")
        prepared_dir = Path(recorded) if recorded else prepared_partition(settings.paths.prepared_dir, parse_day(logical_date))
    if not (Path(prepared_dir) / "user_history.parquet").exists():
        raise FileNotFoundError(
            f"{Path(prepared_dir) / 'user_history.parquet'} is missing: the prepared partition of version {version} "
            "is needed to publish user histories"
        )
    metrics_path = artifact_dir / ARTIFACT_FILES["metrics"]
    return VersionFacts(
        version=version,
        artifact_dir=artifact_dir,
        prepared_dir=Path(prepared_dir),
        logical_date=logical_date,
        data_cutoff_ms=int(cutoff),
        trained_at=manifest.get("trained_at"),
        history_len=int(prepared_manifest.get("history_len", settings.prepare.history_len)),
        metrics=json.loads(metrics_path.read_text()) if metrics_path.exists() else {},
        index=read_index_meta(artifact_dir),
        users_without_examples=manifest.get("users_without_examples"),
    )


# --- what is written (pure given the files) -------------------------------------------------------


def user_rows(artifact_dir: Path) -> tuple[list[str], np.ndarray]:
    """(user_ids, rows float32 [n, id_dim]) of every vocabulary user, from model.pt and vocab_users."""
    state = torch.load(Path(artifact_dir) / ARTIFACT_FILES["model"], map_location="cpu", weights_only=True)
    table = state[USER_ID_TABLE].numpy().astype("<f4", copy=False)
    vocab = pq.read_table(Path(artifact_dir) / ARTIFACT_FILES["vocab_users"], columns=["user_id", "idx"])
    idx = vocab["idx"].to_numpy().astype(np.int64)
    if len(idx) and (idx.min() < 1 or idx.max() >= len(table)):
        raise ValueError(f"{artifact_dir}: vocab_users idx outside the user-ID table (rows 1..{len(table) - 1})")
    return vocab["user_id"].to_pylist(), table[idx]


def _vocab_lookup(path: Path, id_col: str) -> np.ndarray:
    """Vocabulary as an object array indexed by idx (slot 0 and gaps None)."""
    table = pq.read_table(path, columns=[id_col, "idx"])
    idx = table["idx"].to_numpy().astype(np.int64)
    out = np.full(int(idx.max()) + 1 if len(idx) else 1, None, dtype=object)
    out[idx] = table[id_col].to_pylist()
    return out


def history_batches(
    artifact_dir: Path, prepared_dir: Path, history_len: int, batch_size: int
) -> Iterator[list[tuple[str, dict[str, int]]]]:
    """Batches of (user_id, {"<event_id>\\t<item_id>": ts}) with each user's last ``history_len``
    events at the cutoff, read from user_history.parquet in record batches (bounded memory)."""
    path = Path(prepared_dir) / "user_history.parquet"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the prepared partition of this version is needed to publish histories")
    user_of = _vocab_lookup(Path(artifact_dir) / ARTIFACT_FILES["vocab_users"], "user_id")
    item_of = _vocab_lookup(Path(artifact_dir) / ARTIFACT_FILES["vocab_items"], "item_id")
    columns = ["user_idx", "hist", "hist_ts", "hist_event_ids"]
    for batch in pq.ParquetFile(path).iter_batches(batch_size=max(batch_size, 1), columns=columns):
        rows = batch.to_pydict()
        out = []
        for u, its, tss, eids in zip(rows["user_idx"], rows["hist"], rows["hist_ts"], rows["hist_event_ids"]):
            n = min(len(its or []), history_len)
            if n == 0 or u >= len(user_of) or user_of[u] is None:
                continue
            members = {redis_keys.history_member(e, item_of[i]): int(t) for i, t, e in zip(its[-n:], tss[-n:], eids[-n:])}
            out.append((user_of[u], members))
        if out:
            yield out


def version_metadata(facts: VersionFacts, n_users: int, id_dim: int, published_at_ms: int) -> dict[str, Any]:
    """The JSON stored at ``<p>:version:<v>``: everything serving and status need about a version."""
    return {
        "version": facts.version,
        "logical_date": facts.logical_date,
        "trained_at": facts.trained_at,
        "trained_at_iso": ms_iso(int(facts.trained_at * 1000)) if facts.trained_at else None,
        "data_cutoff_ms": facts.data_cutoff_ms,
        "data_cutoff": ms_iso(facts.data_cutoff_ms),
        "metrics": facts.metrics,
        "index": {k: v for k, v in facts.index.items() if k != "tuning"},
        "artifact_dir": str(facts.artifact_dir),
        "n_users": n_users,
        "users_without_examples": facts.users_without_examples,
        "n_items": int(facts.index.get("n_items", 0)),
        "id_dim": id_dim,
        "history_len": facts.history_len,
        "published_at_ms": published_at_ms,
        "published_at": ms_iso(published_at_ms),
    }


def batches(n: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(start + size, n)


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


# --- Redis steps --------------------------------------------------------------------------------------


def pointer_state(client: redis.Redis, prefix: str) -> dict[str, str]:
    """The pointer hash decoded: current, previous, switched_at_ms, current_cutoff_ms, ..."""
    return {k.decode(): v.decode() for k, v in client.hgetall(redis_keys.pointer(prefix)).items()}


def write_rows(
    client: redis.Redis,
    prefix: str,
    version: str,
    user_ids: list[str],
    rows: np.ndarray,
    batch_size: int,
    on_batch: Callable[[int, int], None] | None = None,
) -> tuple[int, int]:
    """Write each user's row unless it exists, pipelined in batches; returns (written, already there)."""
    row_script = client.register_script(ROW_IF_ABSENT)
    written = 0
    total = len(user_ids)
    size = max(batch_size, 1)
    every = max(1, total // size // 10)  # about ten progress lines
    for b, (start, end) in enumerate(batches(total, size)):
        pipe = client.pipeline(transaction=False)
        for uid, row in zip(user_ids[start:end], rows[start:end]):
            row_script(keys=[redis_keys.user_row(prefix, version, uid)], args=[row.tobytes(), NIGHTLY_WINDOW, 0], client=pipe)
        written += sum(1 for r in pipe.execute() if r == 1)
        if on_batch is not None:
            on_batch(b + 1, end)
        if (b + 1) % every == 0 or end == total:
            pct = 100.0 * end / max(total, 1)
            log.info("publish %s: %s of %s user rows written (%.0f%%)", version, f"{end:,}", f"{total:,}", pct)
    return written, total - written


TRIM_BEFORE_CUTOFF = """
local n = redis.call('ZCOUNT', KEYS[1], '-inf', '(' .. ARGV[1])
local extra = n - tonumber(ARGV[2])
if extra > 0 then redis.call('ZREMRANGEBYRANK', KEYS[1], 0, extra - 1) end
return extra
"""
"""KEYS[1] = history zset; ARGV = cutoff_ms, L. Keeps the newest L events before the cutoff and
every event after it: the hourly consumer, replaying the hours after the cutoff, reads the
history as of each hour's start, so events after the cutoff must survive a (re)publish."""


def write_histories(
    client: redis.Redis,
    prefix: str,
    version: str,
    history: Iterator[list[tuple[str, dict[str, int]]]],
    history_len: int,
    cutoff_ms: int,
    on_batch: Callable[[int, int], None] | None = None,
    first_batch: int = 1,
) -> int:
    """Add each user's history events at the cutoff (idempotent ZADD) and trim what lies before
    the cutoff to the newest ``history_len``; returns the number of users written."""
    done = 0
    trim = client.register_script(TRIM_BEFORE_CUTOFF)
    for b, chunk in enumerate(history, start=first_batch):
        pipe = client.pipeline(transaction=False)
        for uid, members in chunk:
            key = redis_keys.user_history(prefix, uid)
            pipe.zadd(key, members)
            trim(keys=[key], args=[cutoff_ms, history_len], client=pipe)
        pipe.execute()
        done += len(chunk)
        if on_batch is not None:
            on_batch(b, done)
        log.info("publish %s: histories of %s users written", version, f"{done:,}")
    return done


def delete_version(client: redis.Redis, prefix: str, version: str, batch: int = 1000) -> int:
    """UNLINK every row of ``version`` (SCAN, so Redis is never blocked), then its metadata and
    its ``versions`` entry. Returns the number of rows deleted."""
    pattern = _glob_escape(f"{prefix}:row:{version}:") + "*"
    deleted = 0
    chunk: list[bytes] = []
    for key in client.scan_iter(match=pattern, count=batch):
        chunk.append(key)
        if len(chunk) >= batch:
            deleted += client.unlink(*chunk)
            chunk = []
    if chunk:
        deleted += client.unlink(*chunk)
    client.unlink(redis_keys.version_meta(prefix, version))
    client.zrem(redis_keys.versions(prefix), version)
    return deleted


def versions_to_delete(pointer: dict[str, str], registered: list[str], keep: int) -> list[str]:
    """Registered versions (newest first) beyond the ``keep`` newest, never current or previous. Pure."""
    protected = [v for v in (pointer.get("current"), pointer.get("previous")) if v]
    ordered = protected + [v for v in registered if v not in protected]
    return [v for v in ordered[max(keep, len(protected)) :]]


def delete_old_versions(client: redis.Redis, prefix: str, keep: int) -> list[str]:
    """Delete versions beyond ``keep`` (current and previous always kept); returns their names."""
    pointer = pointer_state(client, prefix)
    registered = [v.decode() for v in client.zrevrange(redis_keys.versions(prefix), 0, -1)]
    doomed = versions_to_delete(pointer, registered, keep)
    for version in doomed:
        rows = delete_version(client, prefix, version)
        log.info("publish: deleted old version %s from Redis (%s user rows)", version, f"{rows:,}")
    return doomed


# --- the stage ----------------------------------------------------------------------------------------


def publish_version(
    settings: Settings,
    artifact_dir: Path,
    force: bool = False,
    client: redis.Redis | None = None,
    prepared_dir: Path | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Write version ``artifact_dir`` to Redis and switch the serving pointer to it.

    ``force`` publishes over a serving version with a newer data cutoff (a deliberate rollback
    or backfill). ``on_batch(batch_number, users_done)`` is called after each pipelined batch.
    Returns {version, switched, previous, rows_written, rows_kept, histories_written,
    users_without_examples, deleted_versions, seconds} plus ``reason`` when the pointer was not moved.
    """
    from jobs.redis_conn import redis_client

    t0 = time.time()
    facts = version_facts(settings, artifact_dir, prepared_dir)
    prefix, version = settings.redis.prefix, facts.version
    own = client is None
    client = client or redis_client(settings)
    result: dict[str, Any] = {
        "version": version, "switched": False, "previous": None, "rows_written": 0, "rows_kept": 0,
        "histories_written": 0, "users_without_examples": facts.users_without_examples,
        "deleted_versions": [], "seconds": 0.0,
    }  # fmt: skip
    try:
        pointer = pointer_state(client, prefix)
        current = pointer.get("current")
        if current == version and client.exists(redis_keys.version_meta(prefix, version)):
            result.update(reason=f"version {version} is already serving; nothing to do", previous=pointer.get("previous"))
            log.info("publish: %s", result["reason"])
            return result
        current_cutoff = int(pointer.get("current_cutoff_ms", -1))
        if current and not force and facts.data_cutoff_ms < current_cutoff:
            result.update(
                previous=current,
                reason=(
                    f"serving version {current} has data up to {ms_iso(current_cutoff)}, newer than {version}'s "
                    f"{ms_iso(facts.data_cutoff_ms)}; not switching back (publish with force to roll back)"
                ),
            )
            log.warning("publish: %s", result["reason"])
            return result

        client.zadd(redis_keys.versions(prefix), {version: int(t0 * 1000)})
        user_ids, rows = user_rows(facts.artifact_dir)
        size = settings.redis.batch_size
        log.info(
            "publish %s: writing %s user rows (dim %d; %s of them the OOV row: users without a training example), "
            "then histories (<= %d events each), in batches of %d",
            version, f"{len(user_ids):,}", rows.shape[1],
            "?" if facts.users_without_examples is None else f"{facts.users_without_examples:,}", facts.history_len, size,
        )  # fmt: skip
        written, kept = write_rows(client, prefix, version, user_ids, rows, size, on_batch)
        history = history_batches(facts.artifact_dir, facts.prepared_dir, facts.history_len, size)
        row_batches = -(-len(user_ids) // max(size, 1))
        n_hist = write_histories(client, prefix, version, history, facts.history_len, facts.data_cutoff_ms, on_batch, row_batches + 1)
        result.update(rows_written=written, rows_kept=kept, histories_written=n_hist)

        now_ms = int(time.time() * 1000)
        meta = version_metadata(facts, len(user_ids), int(rows.shape[1]), now_ms)
        client.set(redis_keys.version_meta(prefix, version), json.dumps(meta, sort_keys=True))
        switched, why, was = client.register_script(SWITCH_POINTER)(
            keys=[redis_keys.pointer(prefix)], args=[version, facts.data_cutoff_ms, now_ms, "1" if force else "0"]
        )
        why, was = why.decode() if isinstance(why, bytes) else why, (was.decode() if isinstance(was, bytes) else was) or None
        result["previous"] = was
        if switched:
            client.zadd(redis_keys.versions(prefix), {version: now_ms})
            result["switched"] = True
            log.info("publish: serving pointer moved to %s (previous: %s)", version, was or "none")
        elif why == "already_current":
            result["reason"] = f"version {version} is already serving; its missing rows were filled in"
        else:
            result["reason"] = f"serving version {was} got a newer data cutoff while publishing; not switching back"
            log.warning("publish: %s", result["reason"])
        result["deleted_versions"] = delete_old_versions(client, prefix, settings.redis.keep_versions)
    finally:
        if own:
            client.close()
    result["seconds"] = round(time.time() - t0, 3)
    log.info(
        "publish %s: %s in %.1f s (%s rows new, %s already there, %s histories, deleted %s)",
        version, "switched" if result["switched"] else "NOT switched", result["seconds"], f"{result['rows_written']:,}",
        f"{result['rows_kept']:,}", f"{result['histories_written']:,}", result["deleted_versions"] or "nothing",
    )  # fmt: skip
    return result


def rollback(settings: Settings, client: redis.Redis | None = None) -> dict[str, Any]:
    """Serve the previous version again (current and previous swap places), atomically.

    Refuses (``switched`` False, with a reason) when there is no previous version or its
    metadata is gone. Returns {switched, current, previous, reason?}.
    """
    from jobs.redis_conn import redis_client

    own = client is None
    client = client or redis_client(settings)
    prefix = settings.redis.prefix
    try:
        pointer = pointer_state(client, prefix)
        current, previous = pointer.get("current"), pointer.get("previous")
        if not previous:
            return {"switched": False, "current": current, "previous": None, "reason": "there is no previous version to roll back to"}
        if not client.exists(redis_keys.version_meta(prefix, previous)):
            reason = f"previous version {previous} is no longer complete in Redis; publish it again with force instead"
            return {"switched": False, "current": current, "previous": previous, "reason": reason}
        script = client.register_script(ROLLBACK_POINTER)
        switched, _ = script(keys=[redis_keys.pointer(prefix)], args=[previous, int(time.time() * 1000)])
    finally:
        if own:
            client.close()
    if not switched:
        return {"switched": False, "current": current, "previous": previous, "reason": "the pointer moved meanwhile; nothing changed"}
    log.warning("rollback: serving pointer moved back from %s to %s", current, previous)
    return {"switched": True, "current": previous, "previous": current}

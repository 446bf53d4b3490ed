"""Redis I/O of the incremental consumer: rows, histories, checkpoints, counters (keys: twotower.redis_keys).

Every write here is either atomic per user or idempotent, which is what makes the consumer's
effect exactly-once:

* ``apply_user`` is one Lua script on the user's row hash and history zset (one hash tag, so
  one Redis Cluster slot). It writes the new row only when the row's ``w`` (last hour applied)
  is older than this hour, adds the hour's events to the history (ZADD NX: replays are no-ops)
  and trims the history. A replayed hour therefore finds ``w >= hour`` and changes nothing.
* checkpoints are written by a Lua script that never moves a partition backwards (a consumer
  that lost its partitions in a rebalance cannot undo the new owner's progress).
* hour counters are HSET of values computed from the hour's content (replays write the same).

History trimming keeps the newest ``L`` events before the end of the hour just applied, plus
everything newer than ``history_retention`` before it. An hour's update reads the history as it
was at the hour's start (score < start), so later events already in the set never change it;
the retention margin keeps those reads exact when a new version replays hours since its cutoff.

Incremental state keys (``<p>:incr:<name>``):
    ckpt:<v>            hash partition -> Checkpoint JSON (where the consumer of version v resumes)
    ckpt_hist:<p>       zset Checkpoint JSON, score applied_through (seeds a new version; any version)
    dlq_mark            hash partition -> first offset not yet dead-lettered (no duplicate DLQ records)
    win:<v>:<hour>      hash users:<p>, events:<p>, unknown:<p>, new:<p> (per hour and partition)
    windows:<v>         zset hour -> hour (the hours applied for version v)
    status              hash version, last_publish_at, watermark, last_window, updated_at (epoch ms)
    lag                 hash partition -> records behind the log end
    dead                hash partition -> dead-lettered records (cumulative)
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import numpy as np
import redis

from streaming.windows import Checkpoint
from twotower import redis_keys as rk

log = logging.getLogger(__name__)

WINDOW_STATS_TTL_S = 14 * 24 * 3600

APPLY_USER_LUA = """
local applied = 0
if ARGV[2] ~= '' then
  local w = redis.call('HGET', KEYS[1], 'w')
  if (not w) or tonumber(w) < tonumber(ARGV[1]) then
    redis.call('HSET', KEYS[1], 'e', ARGV[2], 'w', ARGV[1])
    redis.call('HSETNX', KEYS[1], 'f', ARGV[1])
    redis.call('HINCRBY', KEYS[1], 'n', ARGV[3])
    applied = 1
  end
end
for i = 7, #ARGV, 2 do
  redis.call('ZADD', KEYS[2], 'NX', ARGV[i], ARGV[i + 1])
end
local keep = tonumber(ARGV[4])
if redis.call('ZCARD', KEYS[2]) > keep then
  local before = redis.call('ZCOUNT', KEYS[2], '-inf', '(' .. ARGV[5])
  local old = redis.call('ZCOUNT', KEYS[2], '-inf', '(' .. ARGV[6])
  local k = math.min(before - keep, old)
  if k > 0 then
    redis.call('ZREMRANGEBYRANK', KEYS[2], 0, k - 1)
  end
end
return applied
"""

# One round trip per user instead of two, and the history comes back as ONE string of item ids
# (oldest first, newline-separated: ids never hold control characters) instead of L members
# to parse: the read side of the hourly path is bound by per-reply work in Python.
READ_USER_LUA = """
local row = redis.call('HMGET', KEYS[1], 'e', 'w', 'n', 'f')
local members = redis.call('ZREVRANGEBYSCORE', KEYS[2], '(' .. ARGV[1], '-inf', 'LIMIT', 0, tonumber(ARGV[2]))
local items = {}
for i = #members, 1, -1 do
  local m = members[i]
  items[#items + 1] = string.sub(m, string.find(m, ARGV[3], 1, true) + 1)
end
return {row[1] or '', row[2] or '', row[3] or '', row[4] or '', table.concat(items, '\\n')}
"""

SAVE_CHECKPOINTS_LUA = """
local written = 0
for i = 1, #ARGV, 4 do
  local cur = redis.call('HGET', KEYS[1], ARGV[i])
  local ok = true
  if cur then
    local c = cjson.decode(cur)
    local a = tonumber(ARGV[i + 2])
    local o = tonumber(ARGV[i + 3])
    if c.applied_through > a or (c.applied_through == a and c.offset > o) then
      ok = false
    end
  end
  if ok then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
    written = written + 1
  end
end
return written
"""


@dataclass(frozen=True)
class StoredRow:
    """A user's row as read from Redis: float32 [e], last hour applied (-1: from the nightly model)."""

    e: np.ndarray
    w: int
    n: int
    f: int = -1
    """First hour the consumer wrote this row (-1: the row came from the nightly publish). Lets a
    replay of an earlier hour classify the user exactly as its first attempt did."""


@dataclass(frozen=True)
class UserWrite:
    """What one user's hour writes: the new row (None: history only) and the hour's events."""

    user_id: str
    row: np.ndarray | None
    n_events: int
    history: list[tuple[int, str]]
    """(ts, member) of the hour's events."""


def encode_row(row: np.ndarray) -> bytes:
    """float32 little-endian bytes (the layout serving and publish use)."""
    return np.asarray(row, dtype="<f4").tobytes()


def decode_row(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<f4").astype(np.float32)


class StreamState:
    """Typed access to the consumer's Redis state for one deployment prefix."""

    def __init__(self, client: redis.Redis, prefix: str):
        self.r = client
        self.p = prefix
        self._apply = client.register_script(APPLY_USER_LUA)
        self._read = client.register_script(READ_USER_LUA)
        self._save = client.register_script(SAVE_CHECKPOINTS_LUA)

    def key(self, name: str) -> str:
        return rk.incremental(self.p, name)

    # --- version -----------------------------------------------------------------------------

    def current_version(self) -> str | None:
        value = self.r.hget(rk.pointer(self.p), "current")
        return value.decode() if value else None

    def forget_versions(self, keep: set[str]) -> list[str]:
        """Delete the consumer state (checkpoints, applied-hour lists) of versions not in ``keep``
        (jobs.publish deletes their rows; hour counters expire on their own)."""
        gone = []
        for key in self.r.scan_iter(match=self.key("ckpt:*"), count=1000):
            version = key.decode().rsplit("ckpt:", 1)[1]
            if version not in keep:
                self.r.unlink(key, self.key(f"windows:{version}"))
                gone.append(version)
        return gone

    def published_versions(self) -> set[str]:
        return {v.decode() for v in self.r.zrange(rk.versions(self.p), 0, -1)}

    def version_meta(self, version: str) -> dict:
        raw = self.r.get(rk.version_meta(self.p, version))
        return json.loads(raw) if raw else {}

    # --- rows and histories -----------------------------------------------------------------

    def read_users(self, version: str, user_ids: list[str], before_ms: int, history_len: int) -> tuple[dict[str, StoredRow], dict[str, list[str]]]:
        """Rows of ``version`` and histories as of ``before_ms`` (items of the newest
        ``history_len`` events with ts < before_ms, oldest first), one pipelined round trip."""
        pipe = self.r.pipeline(transaction=False)
        for uid in user_ids:
            keys = [rk.user_row(self.p, version, uid), rk.user_history(self.p, uid)]
            self._read(keys=keys, args=[before_ms, history_len, rk.HIST_SEP], client=pipe)
        rows: dict[str, StoredRow] = {}
        hists: dict[str, list[str]] = {}
        for uid, (e, w, n, f, items) in zip(user_ids, pipe.execute()):
            if e:
                rows[uid] = StoredRow(decode_row(e), int(w) if w else -1, int(n or 0), int(f) if f else -1)
            hists[uid] = items.decode().split("\n") if items else []
        return rows, hists

    def apply_users(self, version: str, hour_ms: int, writes: list[UserWrite], history_len: int, retention_ms: int) -> int:
        """Write each user's row (if newer than its ``w``) and history atomically per user;
        returns how many rows were written (replayed users count 0)."""
        end = hour_ms + 3_600_000
        pipe = self.r.pipeline(transaction=False)
        for wr in writes:
            args: list = [hour_ms, encode_row(wr.row) if wr.row is not None else b"", wr.n_events, history_len, end, end - retention_ms]
            for ts, member in wr.history:
                args += [ts, member]
            self._apply(keys=[rk.user_row(self.p, version, wr.user_id), rk.user_history(self.p, wr.user_id)], args=args, client=pipe)
        return int(sum(pipe.execute()))

    # --- checkpoints ---------------------------------------------------------------------------

    def load_checkpoints(self, version: str) -> dict[int, Checkpoint]:
        raw = self.r.hgetall(self.key(f"ckpt:{version}"))
        return {int(k): Checkpoint.from_json(v) for k, v in raw.items()}

    def checkpoint_history(self, partition: int, max_applied_through: int) -> list[Checkpoint]:
        """Snapshots of a partition taken with nothing after ``max_applied_through`` applied."""
        raw = self.r.zrevrangebyscore(self.key(f"ckpt_hist:{partition}"), max_applied_through, "-inf", start=0, num=50)
        return [Checkpoint.from_json(v) for v in raw]

    def save_checkpoints(self, version: str, ckpts: dict[int, Checkpoint], history_retention_ms: int) -> int:
        """Store the partitions' checkpoints (never moving one backwards) and their snapshots."""
        if not ckpts:
            return 0
        args: list = []
        for p, c in sorted(ckpts.items()):
            args += [str(p), c.to_json(), c.applied_through, c.offset]
        written = int(self._save(keys=[self.key(f"ckpt:{version}")], args=args))
        pipe = self.r.pipeline(transaction=False)
        for p, c in ckpts.items():
            hist = self.key(f"ckpt_hist:{p}")
            pipe.zadd(hist, {c.to_json(): c.applied_through})
            pipe.zremrangebyscore(hist, "-inf", f"({c.applied_through - history_retention_ms}")
        pipe.hset(self.key("dead"), mapping={str(p): c.dead for p, c in ckpts.items()})
        pipe.execute()
        return written

    def dlq_marks(self) -> dict[int, int]:
        return {int(k): int(v) for k, v in self.r.hgetall(self.key("dlq_mark")).items()}

    def save_dlq_marks(self, marks: dict[int, int]) -> None:
        if marks:
            self.r.hset(self.key("dlq_mark"), mapping={str(p): o for p, o in marks.items()})

    # --- counters and status -------------------------------------------------------------------

    def record_window(self, version: str, hour_ms: int, per_partition: dict[int, dict[str, int]]) -> None:
        """Per-hour, per-partition counts (values computed from the hour's content: replays
        write the same numbers)."""
        key = self.key(f"win:{version}:{hour_ms}")
        mapping = {f"{name}:{p}": int(v) for p, counts in per_partition.items() for name, v in counts.items()}
        pipe = self.r.pipeline(transaction=False)
        if mapping:
            pipe.hset(key, mapping=mapping)
            pipe.expire(key, WINDOW_STATS_TTL_S)
        pipe.zadd(self.key(f"windows:{version}"), {str(hour_ms): hour_ms})
        pipe.zremrangebyscore(self.key(f"windows:{version}"), "-inf", f"({hour_ms - WINDOW_STATS_TTL_S * 1000}")
        pipe.execute()

    def window_counts(self, version: str, hour_ms: int) -> dict[str, int]:
        """Counts of one hour summed over partitions: users, events, unknown, new."""
        totals: dict[str, int] = {}
        for field, value in self.r.hgetall(self.key(f"win:{version}:{hour_ms}")).items():
            name = field.decode().split(":", 1)[0]
            totals[name] = totals.get(name, 0) + int(value)
        return totals

    def applied_windows(self, version: str) -> list[int]:
        return [int(float(s)) for _, s in self.r.zrange(self.key(f"windows:{version}"), 0, -1, withscores=True)]

    def set_status(self, version: str, watermark_ms: int | None, last_window: int | None, published_at_ms: int | None, now_ms: int) -> None:
        mapping: dict[str, int | str] = {"version": version, "updated_at": now_ms}
        if watermark_ms is not None:
            mapping["watermark"] = watermark_ms
        if last_window is not None:
            mapping["last_window"] = last_window
        if published_at_ms is not None:
            mapping["last_publish_at"] = published_at_ms
        self.r.hset(self.key("status"), mapping=mapping)

    def set_lag(self, lag: dict[int, int]) -> None:
        if lag:
            self.r.hset(self.key("lag"), mapping={str(p): int(v) for p, v in lag.items()})

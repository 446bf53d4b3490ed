"""Redis I/O of the incremental consumer: rows, histories, checkpoints, counters (keys: twotower.redis_keys).

Every write here is either atomic per user or idempotent, which is what makes the consumer's
effect exactly-once:

* ``apply_users`` runs one Lua script per batch of users (a script runs atomically, so every
  user's row hash and history zset change together; each user's keys share one hash tag). It
  writes a new row only when the row's ``w`` (last hour applied) is older than this hour, adds
  the hour's events to the history (ZADD NX: replays are no-ops) and trims the history. A
  replayed hour therefore finds ``w >= hour`` and changes nothing.
* checkpoints are written by a Lua script that never moves a partition backwards (a consumer
  that lost its partitions in a rebalance cannot undo the new owner's progress).
* hour counters are HSET of values computed from the hour's content (replays write the same).

History trimming (once a history holds ``L + TRIM_SLACK`` events) keeps the newest ``L`` events
before the end of the hour just applied, plus
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
from typing import NamedTuple

import numpy as np
import redis

from streaming.windows import Checkpoint
from twotower import redis_keys as rk

log = logging.getLogger(__name__)

WINDOW_STATS_TTL_S = 14 * 24 * 3600
USER_BATCH = 256
TRIM_SLACK = 16
"""A history is trimmed back once it holds this many events more than it must keep."""
"""Users per script call: one call runs about 3 ms on the server at this size, short enough not
to hold up the serving layer's reads."""

# Both scripts take a BATCH of users (KEYS: row_1, hist_1, row_2, hist_2, ...): one round trip
# and one script call per batch instead of per user. The hourly path is bound by per-command work
# (client packing and reply parsing, the server's script setup), not by the data. Each user's
# keys still share one hash tag; a Redis Cluster deployment would group a batch by slot.
#
# APPLY: ARGV = keep (L), retention (ms), trim slack, then per write 8 values:
#   hour, row bytes ('' = history only), n_events, expect_w, since, since_n, the hour's event
#   timestamps (decimal, space-separated) and their history members (newline-separated; ids never
#   hold control characters): two strings instead of 2 x m arguments, and one ZADD per user.
# A batch may hold several hours, and one user several times (in hour order): streaming.batch
# computes a user's later hours from what its earlier writes are predicted to leave, and the
# guard checks that prediction before writing: ``expect_w`` ('*': no check) is the row's ``w``
# the computation assumed ('' = no row or a nightly row), and ``since``/``since_n`` ('': no
# check) say the history must hold exactly since_n events from ``since`` on (what the user's
# previous write in the batch added, and nothing else). A failed guard writes nothing and
# reports a conflict; the caller recomputes from Redis.
# Per write: the row (e, w, n += events, f once) only if its ``w`` is older than the hour; ZADD
# NX the hour's events; once the history holds more than L + slack, trim it (newest L before
# the hour's end, plus everything newer than the retention): trimming every time cost three more
# commands per user, and reads only ever take the newest L. Returns per write ``applied`` (1:
# the row was written), ``exact`` (1: every one of the m members was new and the history holds
# nothing else from the hour's start on, so "history before the next hour" is exactly "history
# before this hour" + these m events: what streaming.user_cache relies on) and ``conflict``.
APPLY_USERS_LUA = """
local keep = tonumber(ARGV[1])
local retention = tonumber(ARGV[2])
local slack = tonumber(ARGV[3])
local out = {}
local a = 4
for k = 1, #KEYS, 2 do
  local row, hist = KEYS[k], KEYS[k + 1]
  local hour_s, row_bytes, expect_w, since = ARGV[a], ARGV[a + 1], ARGV[a + 3], ARGV[a + 4]
  local hour = tonumber(hour_s)
  local events = tonumber(ARGV[a + 2])
  local since_n = tonumber(ARGV[a + 5])
  local stamps, members = ARGV[a + 6], ARGV[a + 7]
  a = a + 8
  local cur = nil
  local ok = true
  if row_bytes ~= '' or expect_w ~= '*' then
    cur = redis.call('HMGET', row, 'w', 'n', 'f')
    if expect_w ~= '*' and (cur[1] or '') ~= expect_w then
      ok = false
    end
  end
  if ok and since ~= '' and redis.call('ZCOUNT', hist, since, '+inf') ~= since_n then
    ok = false
  end
  if not ok then
    out[#out + 1] = 0
    out[#out + 1] = 0
    out[#out + 1] = 1
  else
    local applied = 0
    if row_bytes ~= '' and ((not cur[1]) or tonumber(cur[1]) < hour) then
      local n = string.format('%d', (tonumber(cur[2]) or 0) + events)
      redis.call('HSET', row, 'e', row_bytes, 'w', hour_s, 'n', n, 'f', cur[3] or hour_s)
      applied = 1
    end
    local m, added, pairs = 0, 0, {}
    local next_member = string.gmatch(members, '[^\\n]+')
    for ts in string.gmatch(stamps, '%S+') do
      pairs[#pairs + 1] = ts
      pairs[#pairs + 1] = next_member()
      m = m + 1
      if #pairs >= 1000 then  -- a bounded unpack (Lua's C stack)
        added = added + redis.call('ZADD', hist, 'NX', unpack(pairs))
        pairs = {}
      end
    end
    if #pairs > 0 then
      added = added + redis.call('ZADD', hist, 'NX', unpack(pairs))
    end
    if redis.call('ZCARD', hist) > keep + slack then
      local hour_end = hour + 3600000
      local n_before = redis.call('ZCOUNT', hist, '-inf', '(' .. string.format('%d', hour_end))
      local n_old = redis.call('ZCOUNT', hist, '-inf', '(' .. string.format('%d', hour_end - retention))
      local n = math.min(n_before - keep, n_old)
      if n > 0 then
        redis.call('ZREMRANGEBYRANK', hist, 0, n - 1)
      end
    end
    local exact = 0
    if added == m and redis.call('ZCOUNT', hist, hour_s, '+inf') == m then
      exact = 1
    end
    out[#out + 1] = applied
    out[#out + 1] = exact
    out[#out + 1] = 0
  end
end
return out
"""

# READ: ARGV = L, separator, then per user ``before`` (ms). Per user 6 values: e, w, n, f ('' when
# absent), the item ids of the newest L history events with ts < before, oldest first, as ONE
# string joined by newlines (ids never hold control characters: one reply element per user
# instead of L members to parse), and how many history events have ts >= before (0 unless
# hours from ``before`` on were written already: a replay).
READ_USERS_LUA = """
local limit = tonumber(ARGV[1])
local out = {}
local a = 3
for k = 1, #KEYS, 2 do
  local row = redis.call('HMGET', KEYS[k], 'e', 'w', 'n', 'f')
  local members = redis.call('ZREVRANGEBYSCORE', KEYS[k + 1], '(' .. ARGV[a], '-inf', 'LIMIT', 0, limit)
  local items = {}
  for i = #members, 1, -1 do
    local m = members[i]
    items[#items + 1] = string.sub(m, string.find(m, ARGV[2], 1, true) + 1)
  end
  out[#out + 1] = row[1] or ''
  out[#out + 1] = row[2] or ''
  out[#out + 1] = row[3] or ''
  out[#out + 1] = row[4] or ''
  out[#out + 1] = table.concat(items, '\\n')
  out[#out + 1] = redis.call('ZCOUNT', KEYS[k + 1], ARGV[a], '+inf')
  a = a + 1
end
return out
"""

# RECORD: KEYS = the version's hour zset, then one counter hash per hour; ARGV = ttl (s), the
# oldest hour to keep in the zset (ms), then per hour: hour (ms), n, and n field/value pairs.
# What a pipeline of HSET + EXPIRE per hour, ZADD and ZREMRANGEBYSCORE did, in one call (the
# client packs one command instead of two per hour: a backlog's batch holds 168 hours).
RECORD_WINDOWS_LUA = """
local ttl = ARGV[1]
local a = 3
local members = {}
for k = 2, #KEYS do
  local hour = ARGV[a]
  local n = tonumber(ARGV[a + 1])
  if n > 0 then
    redis.call('HSET', KEYS[k], unpack(ARGV, a + 2, a + 1 + 2 * n))
    redis.call('EXPIRE', KEYS[k], ttl)
  end
  members[#members + 1] = hour
  members[#members + 1] = hour
  if #members >= 1000 then  -- a bounded unpack (Lua's C stack)
    redis.call('ZADD', KEYS[1], unpack(members))
    members = {}
  end
  a = a + 2 + 2 * n
end
if #members > 0 then
  redis.call('ZADD', KEYS[1], unpack(members))
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[2])
return 1
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


@dataclass(frozen=True, slots=True)
class StoredRow:
    """A user's row as read from Redis: float32 [e], last hour applied (-1: from the nightly model)."""

    e: np.ndarray
    w: int
    n: int
    f: int = -1
    """First hour the consumer wrote this row (-1: the row came from the nightly publish). Lets a
    replay of an earlier hour classify the user exactly as its first attempt did."""


class UserWrite(NamedTuple):
    """What one user's hour writes: the new row (None: history only) and the hour's events."""

    user_id: str
    row: np.ndarray | None
    n_events: int
    history: list[tuple[int, str]]
    """(ts, member) of the hour's events."""


class Guard(NamedTuple):
    """What a write assumes about the user's state (see APPLY_USERS_LUA); NO_GUARD assumes nothing."""

    expect_w: str
    """The row's ``w`` as stored ('' for no row or a nightly row; '*': not checked)."""
    since: str
    """'' (not checked), or an hour (ms): the history must hold exactly ``since_n`` events from it on."""
    since_n: int


NO_GUARD = Guard("*", "", 0)


class WriteOutcome(NamedTuple):
    """What the apply script did for one user."""

    applied: bool
    """The row was written (False: history only, or the row already records this hour)."""
    exact: bool
    """Every event of the hour was new to the history and nothing else is in it from the hour's
    start on (streaming.user_cache keeps the user only then)."""
    conflict: bool = False
    """The write's Guard failed: nothing was written."""


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
        self._apply = client.register_script(APPLY_USERS_LUA)
        self._read = client.register_script(READ_USERS_LUA)
        self._save = client.register_script(SAVE_CHECKPOINTS_LUA)
        self._record = client.register_script(RECORD_WINDOWS_LUA)

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

    def read_users(
        self, version: str, user_ids: list[str], before_ms: int | list[int], history_len: int
    ) -> tuple[dict[str, StoredRow], dict[str, list[str]], dict[str, int]]:
        """Rows of ``version``, histories as of ``before_ms`` (one for all, or one per user: items
        of the newest ``history_len`` events with ts < before, oldest first) and how many history
        events each user has at or after it: one script call per ``USER_BATCH`` users, all in one
        pipelined round trip."""
        befores = before_ms if isinstance(before_ms, list) else [before_ms] * len(user_ids)
        pipe = self.r.pipeline(transaction=False)
        for start in range(0, len(user_ids), USER_BATCH):
            end = start + USER_BATCH
            self._read(keys=self._user_keys(version, user_ids[start:end]), args=[history_len, rk.HIST_SEP, *befores[start:end]], client=pipe)
        flat = [v for reply in pipe.execute() for v in reply]
        rows: dict[str, StoredRow] = {}
        hists: dict[str, list[str]] = {}
        later: dict[str, int] = {}
        for j, uid in enumerate(user_ids):
            e, w, n, f, items, after = flat[6 * j : 6 * j + 6]
            if e:
                rows[uid] = StoredRow(decode_row(e), int(w) if w else -1, int(n or 0), int(f) if f else -1)
            hists[uid] = items.decode().split("\n") if items else []
            later[uid] = int(after)
        return rows, hists, later

    def apply_users(self, version: str, hour_ms: int, writes: list[UserWrite], history_len: int, retention_ms: int) -> list[WriteOutcome]:
        """Write each user's row (if newer than its ``w``) and history for one hour (see apply_writes)."""
        return self.apply_writes(version, [(hour_ms, wr, NO_GUARD) for wr in writes], history_len, retention_ms)

    def apply_writes(
        self, version: str, writes: list[tuple[int, UserWrite, Guard]], history_len: int, retention_ms: int
    ) -> list[WriteOutcome]:
        """Write (hour, write, guard) triples in order: each user's row (if newer than its ``w``)
        and history atomically, when its guard holds; one script call per ``USER_BATCH`` writes,
        all in one pipelined round trip; one WriteOutcome per write, in order."""
        pipe = self.r.pipeline(transaction=False)
        for start in range(0, len(writes), USER_BATCH):
            batch = writes[start : start + USER_BATCH]
            args: list = [history_len, retention_ms, TRIM_SLACK]
            for hour_ms, wr, guard in batch:
                args += [
                    hour_ms, encode_row(wr.row) if wr.row is not None else b"", wr.n_events, *guard,
                    " ".join([str(ts) for ts, _ in wr.history]), "\n".join([member for _, member in wr.history]),
                ]
            self._apply(keys=self._user_keys(version, [wr.user_id for _, wr, _ in batch]), args=args, client=pipe)
        flat = [v for reply in pipe.execute() for v in reply]
        return [WriteOutcome(bool(flat[3 * j]), bool(flat[3 * j + 1]), bool(flat[3 * j + 2])) for j in range(len(writes))]

    def _user_keys(self, version: str, user_ids: list[str]) -> list[str]:
        """[row_1, hist_1, row_2, hist_2, ...] (the layout both batch scripts take)."""
        keys = []
        for uid in user_ids:
            keys += [rk.user_row(self.p, version, uid), rk.user_history(self.p, uid)]
        return keys

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
        self.record_windows(version, [(hour_ms, per_partition)])

    def record_windows(self, version: str, hours: list[tuple[int, dict[int, dict[str, int]]]]) -> None:
        """``record_window`` for several hours in one round trip (one script call)."""
        if not hours:
            return
        keys = [self.key(f"windows:{version}")]
        args: list[int | str] = [WINDOW_STATS_TTL_S, max(h for h, _ in hours) - WINDOW_STATS_TTL_S * 1000]
        for hour_ms, per_partition in hours:
            keys.append(self.key(f"win:{version}:{hour_ms}"))
            pairs = [x for p, counts in per_partition.items() for name, v in counts.items() for x in (f"{name}:{p}", int(v))]
            args += [hour_ms, len(pairs) // 2, *pairs]
        self._record(keys=keys, args=args)

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

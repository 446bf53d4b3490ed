"""Who applies the closed hours: the consumer hands batches of hours to an applier and collects
the HourResults. Two kinds, one interface (``submit`` -> Future, ``forget_users``, ``close``):

    thread (default)   a thread of the consumer process
    process            a worker process, ``python -m streaming.applier``, fed over its stdin and
                       answering on its stdout

Why a process at all: the consumer's two halves are Python-bound. The Kafka side (kafka-python's record
decoding, parsing, windows) and the update side (Redis script batches, the per-user bookkeeping,
small tensor ops) each need about a core at full speed, and as two threads of one interpreter
they take turns on one lock. In two processes they run side by side, at the price of a second
interpreter (imports and the version loaded again: 1-2 s at start, the model's memory twice).
On the 2-core reference machine, where Redis and the broker share those cores, the process
applies a backlog 8-18% faster (benchmarks/RESULTS.md); the thread stays the default for its
quicker start and single copy of the model.

The worker is part of the consumer, not a service: it holds the loaded version and the user
cache (streaming.user_cache) for the hours it applies, writes Redis itself, and lives and dies
with the consumer: it asks the kernel for SIGKILL when its parent dies (Linux; elsewhere it
exits at EOF on stdin), and when the worker is killed the consumer kills itself with the same
signal (a crash of either is a crash of the consumer: the restart resumes from the stored
positions, exactly as after a kill -9 of a single process). Any other worker failure is raised
from ``Future.result()`` with the worker's message.

Frames: 4-byte big-endian length + UTF-8 JSON. Requests: ``{"op": "apply", "version": v,
"hours": [[hour_ms, [partition, ...], "event_id<TAB>user_id<TAB>item_id<TAB>event_type<TAB>...",
[ts, ...], [weight, ...]], ...]}`` (encode_hours) and ``{"op": "forget", "why": ...}``;
replies ``{"results": [HourResult fields, ...]}``, ``{"ok": true}`` or ``{"error": message}``.
JSON, not pickle or marshal: nothing here executes what it reads, and a malformed frame is an
error, not a crash (tests/test_security.py bans both from product code).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import fields
from functools import partial
from itertools import repeat
from typing import IO, Any, Callable

from streaming.events import Event
from streaming.faults import crash_point
from streaming.gc_tuning import set_consumer_thresholds
from streaming.batch import apply_batch
from streaming.hour import HourResult
from streaming.state import StreamState
from streaming.user_cache import UserCache
from streaming.version import LoadedVersion
from streaming.windows import Buffered
from twotower.config import PROJECT_ROOT, IncrementalConfig, Settings, settings_env

log = logging.getLogger("streaming.consumer")

Hours = list[tuple[int, list[Buffered]]]
PROCESS, THREAD = "process", "thread"
_LEN = struct.Struct(">I")


# --- the work itself (both kinds) --------------------------------------------------------------


def apply_hours(state: StreamState, version: LoadedVersion, hours: Hours, cfg: IncrementalConfig, cache: UserCache | None) -> list[HourResult]:
    """Write the hours in order (streaming.batch: one read and two write round trips for the
    lot), log them in words, then record their counters in one round trip (a crash before that
    replays the hours, which write the same counters: they are functions of the hours' content)."""
    from streaming.consumer import iso

    t0 = time.perf_counter()
    results = apply_batch(state, version, hours, cfg, cache)
    for r in results:
        log.info(
            "hour %s applied to version %s: %d users updated (%d new, %d rows written now), %d events, "
            "%d on unknown items, %d users history only, %.3fs (read %.3fs, update %.3fs, write %.3fs)",
            iso(r.hour_ms), version.version, r.users_updated, r.new_users, r.rows_written, r.events_applied,
            r.unknown_items, r.history_only, r.read_s + r.compute_s + r.write_s, r.read_s, r.compute_s, r.write_s,
        )
    if len(results) > 1:
        log.info("%d hours applied in %.2fs", len(results), time.perf_counter() - t0)
    crash_point("after_rows")
    state.record_windows(version.version, [(r.hour_ms, r.per_partition) for r in results])
    return results


# --- wire format ------------------------------------------------------------------------------


def write_frame(stream: IO[bytes], message: dict) -> None:
    body = json.dumps(message, separators=(",", ":")).encode()
    stream.write(_LEN.pack(len(body)) + body)
    stream.flush()


def read_frame(stream: IO[bytes]) -> dict | None:
    """The next message, or None at EOF (the other side is gone)."""
    head = stream.read(_LEN.size)
    if len(head) < _LEN.size:
        return None
    n = _LEN.unpack(head)[0]
    body = stream.read(n)
    if len(body) < n:
        return None
    return json.loads(body)


FIELD_SEP = "\t"
"""Separates the string fields of a batch's events on the wire: ids and event types never hold
control characters (streaming.events refuses them)."""


def encode_hours(hours: Hours) -> list:
    """Only what applying needs, by column: per hour [hour, partitions, the events' event_id,
    user_id, item_id and event_type joined by FIELD_SEP, ts, weight]. One string per hour
    instead of a list per event: the JSON of a 168-hour batch is written and read in a few
    C-level passes (the prefix state of each event stays behind)."""
    wire = []
    for hour, buffered in hours:
        events = [b.event for b in buffered]
        text = FIELD_SEP.join([field for e in events for field in (e.event_id, e.user_id, e.item_id, e.event_type)])
        wire.append([hour, [b.partition for b in buffered], text, [e.ts for e in events], [e.weight for e in events]])
    return wire


def decode_hours(wire: list) -> Hours:
    """The inverse of encode_hours (Buffered events with their partition; the prefix state 0)."""
    hours: Hours = []
    for hour, partitions, text, ts, weights in wire:
        fields_ = text.split(FIELD_SEP) if partitions else []
        if len(fields_) != 4 * len(partitions) or not len(partitions) == len(ts) == len(weights):
            raise ValueError(f"a malformed batch: hour {hour} has {len(partitions)} events but {len(fields_)} fields")
        events = map(_new_event, zip(fields_[0::4], fields_[1::4], fields_[2::4], fields_[3::4], ts, weights))
        hours.append((int(hour), list(map(_new_buffered, zip(partitions, repeat(0), events, repeat(0), repeat(0), repeat(0))))))
    return hours


# the named tuples built with tuple.__new__ from C-level map() instead of their own __new__ (a
# Python function) in a comprehension: about 0.5 µs per event instead of 0.7-1
_new_event = partial(tuple.__new__, Event)
_new_buffered = partial(tuple.__new__, Buffered)


_RESULT_FIELDS = [f.name for f in fields(HourResult)]
# what merge_results sums (int counters) and takes the longest of (float seconds), read off
# HourResult so that a new field is merged without a second list to keep in step
_COUNT_FIELDS = [f.name for f in fields(HourResult) if f.type == "int" and f.name != "hour_ms"]
_TIME_FIELDS = [f.name for f in fields(HourResult) if f.type == "float"]


def result_to_wire(result: HourResult) -> dict:
    """An HourResult's fields (dataclasses.asdict deep-copies every value: 168 hours' worth of it
    cost more than their JSON)."""
    return {name: getattr(result, name) for name in _RESULT_FIELDS}


def result_from_wire(data: dict) -> HourResult:
    data = dict(data)
    data["per_partition"] = {int(p): counts for p, counts in data["per_partition"].items()}
    return HourResult(**{name: data[name] for name in _RESULT_FIELDS})


# --- the two kinds ----------------------------------------------------------------------------


class InOrder:
    """Runs the batches handed to one applier, one after the other, and refuses every batch
    after one that failed. The consumer queues the next batch while one is being written; if
    that one fails, applying the next would write later hours over missing earlier ones, whose
    own updates the rows' ``w`` would then refuse after the restart: lost, not replayed."""

    def __init__(self) -> None:
        self.failure: str | None = None

    def run(self, work: Callable[[], Any]) -> Any:
        if self.failure is not None:
            raise RuntimeError(f"not applied: an earlier batch of hours failed ({self.failure})")
        try:
            return work()
        except BaseException as exc:
            self.failure = f"{type(exc).__name__}: {exc}"
            raise


class ThreadApplier:
    """Hours applied by one thread of this process (see module docstring)."""

    def __init__(self, state: StreamState, cfg: IncrementalConfig):
        self.state, self.cfg = state, cfg
        self.cache: UserCache | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hour-applier")
        self._order = InOrder()

    def submit(self, version: LoadedVersion, hours: Hours) -> Future:
        if self.cfg.cache_users > 0 and (self.cache is None or self.cache.version != version.version):
            self.cache = UserCache(version.version, self.cfg.cache_users)
        cache = self.cache
        return self._pool.submit(self._order.run, lambda: apply_hours(self.state, version, hours, self.cfg, cache))

    def forget_users(self, why: str) -> None:
        if self.cache is not None:
            self.cache.forget(why)

    def cache_stats(self) -> dict[str, int]:
        return self.cache.stats() if self.cache is not None else {}

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class ProcessApplier:
    """Hours applied by a worker process (see module docstring). Started at once, so that its
    imports and version load overlap the consumer's group join."""

    def __init__(self, settings: Settings, version: str | None = None):
        env = dict(os.environ) | settings_env(settings)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streaming.applier"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, cwd=PROJECT_ROOT,
        )
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="applier-io")
        self._stats: dict[str, int] = {}
        self._order = InOrder()
        if version is not None:
            self._io.submit(self._call, {"op": "load", "version": version})

    def submit(self, version: LoadedVersion, hours: Hours) -> Future:
        request = {"op": "apply", "version": version.version, "hours": encode_hours(hours)}
        return self._io.submit(self._order.run, lambda: [result_from_wire(r) for r in self._call(request)["results"]])

    def forget_users(self, why: str) -> None:
        self._io.submit(self._call, {"op": "forget", "why": why}).result()

    def cache_stats(self) -> dict[str, int]:
        return self._stats

    def _call(self, request: dict) -> dict:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            write_frame(self.proc.stdin, request)
            reply = read_frame(self.proc.stdout)
        except BrokenPipeError:
            reply = None
        if reply is None:
            self._worker_died()
        if "error" in reply:
            raise RuntimeError(f"the hour applier failed: {reply['error']}")
        self._stats = reply.get("cache", self._stats)
        return reply

    def _worker_died(self) -> None:
        code = self.proc.wait()
        if code < 0:
            # killed (kill -9, the OOM killer, a fault test's crash point): the consumer goes down
            # the same way, so that nothing after the crash claims the hours done
            log.critical("the hour applier process was killed by signal %d: stopping the consumer the same way", -code)
            os.kill(os.getpid(), -code)
        raise RuntimeError(f"the hour applier process exited with code {code}")

    def close(self) -> None:
        if self.proc.poll() is None and self.proc.stdin is not None:
            try:
                self.proc.stdin.close()  # EOF: the worker exits after its current request
            except BrokenPipeError:
                pass
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._io.shutdown(wait=True)


class ShardedApplier:
    """Hours applied by ``n`` worker processes at once, worker k taking the events of the
    partitions p with p mod n = k. Producers key events by user_id, so a user's events, row and
    history belong to one partition and the workers touch disjoint users; each row comes out of
    the same arithmetic as with one worker (streaming.update cuts blocks per hour and partition).
    What this buys: on the 2-core reference machine two workers apply the synthetic stream
    (about one event per user-hour, where the update's arithmetic and bookkeeping dominate)
    17-30% faster than one; MovieLens, where reading takes more of the time, not measurably
    (benchmarks/RESULTS.md). The split is by partition number, not by rank among the
    partitions a member owns, so that a partition stays with one worker (and its user cache)
    however the partitions come and go; a member owning only partitions of one residue class
    keeps one worker busy.

    A batch is done when every worker has written its share (the consumer stores the positions
    only then); its HourResults are the workers' summed per hour. A worker's failure fails the
    batch, and a worker killed kills the consumer, as with one worker; the shares a worker
    already wrote are replays after the restart, recognised per user as after any crash."""

    def __init__(self, shards: "list[ProcessApplier]"):
        self.shards = shards

    def submit(self, version: LoadedVersion, hours: Hours) -> Future:
        n = len(self.shards)
        shares: list[Hours] = [[] for _ in range(n)]
        for hour, buffered in hours:
            parts: list[list[Buffered]] = [[] for _ in range(n)]
            for b in buffered:
                parts[b.partition % n].append(b)
            for k, part in enumerate(parts):
                if part:
                    shares[k].append((hour, part))
        futures = [shard.submit(version, share) for shard, share in zip(self.shards, shares) if share]
        return _merged(futures, [hour for hour, _ in hours])

    def forget_users(self, why: str) -> None:
        for shard in self.shards:
            shard.forget_users(why)

    def cache_stats(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for shard in self.shards:
            for name, value in shard.cache_stats().items():
                totals[name] = totals.get(name, 0) + value
        return totals

    def close(self) -> None:
        for shard in self.shards:
            shard.close()


def _merged(futures: list[Future], hours: list[int]) -> Future:
    """A Future of one HourResult per hour of ``hours`` (in that order), summed over the
    workers' results, set when every future is done (the first failure, if any)."""
    merged: Future = Future()
    left = [len(futures)]
    lock = threading.Lock()  # the callbacks run on each worker's I/O thread, possibly at once

    def one_done(_: Future) -> None:
        with lock:
            left[0] -= 1
            if left[0]:
                return
        failed = next((f.exception() for f in futures if f.exception() is not None), None)
        if failed is not None:
            merged.set_exception(failed)
        else:
            merged.set_result(merge_results(hours, [r for f in futures for r in f.result()]))

    if not futures:
        merged.set_result(merge_results(hours, []))
    for future in futures:
        future.add_done_callback(one_done)
    return merged


def merge_results(hours: list[int], results: list[HourResult]) -> list[HourResult]:
    """One HourResult per hour: the counters summed, the per-partition counts joined (the
    workers' partitions are disjoint), the times the longest worker's."""
    out = {hour: HourResult(hour) for hour in hours}
    for r in results:
        m = out[r.hour_ms]
        for name in _COUNT_FIELDS:
            setattr(m, name, getattr(m, name) + getattr(r, name))
        for name in _TIME_FIELDS:
            setattr(m, name, max(getattr(m, name), getattr(r, name)))
        m.per_partition.update(r.per_partition)
    return [out[hour] for hour in hours]


def make_applier(settings: Settings, state: StreamState, version: str | None):
    kind, workers = settings.incremental.applier, settings.incremental.applier_workers
    if workers < 1 or (workers > 1 and kind != PROCESS):
        raise ValueError(f"incremental.applier_workers must be 1, or more with applier {PROCESS!r}; got {workers} with {kind!r}")
    if kind == PROCESS:
        if workers > 1:
            return ShardedApplier([ProcessApplier(settings, version) for _ in range(workers)])
        return ProcessApplier(settings, version)
    if kind == THREAD:
        return ThreadApplier(state, settings.incremental)
    raise ValueError(f"incremental.applier must be {PROCESS!r} or {THREAD!r}, got {kind!r}")


# --- the worker process -----------------------------------------------------------------------


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when the consumer dies (elsewhere: EOF on stdin ends it)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before the request took effect
        os._exit(1)


def serve(inp: IO[bytes], out: IO[bytes], settings: Settings, load: Callable[[str], LoadedVersion]) -> None:
    """The worker's loop: one request in, one reply out, until EOF."""
    import torch
    from threadpoolctl import threadpool_limits

    from jobs.redis_conn import redis_client

    torch.set_num_threads(max(1, settings.incremental.threads))
    threadpool_limits(limits=max(1, settings.incremental.threads), user_api="blas")  # as the consumer does
    set_consumer_thresholds()  # the worker is the consumer's own process (streaming.gc_tuning)
    cfg = settings.incremental
    state = StreamState(redis_client(settings), settings.redis.prefix)
    version: LoadedVersion | None = None
    cache: UserCache | None = None
    while (request := read_frame(inp)) is not None:
        try:
            op = request.get("op")
            if op in ("load", "apply") and (version is None or version.version != request["version"]):
                first = version is None
                version = load(request["version"])
                if first:
                    gc.freeze()  # as the consumer does (streaming.consumer): long-lived objects out of full GC scans
                cache = UserCache(version.version, cfg.cache_users) if cfg.cache_users > 0 else None
            reply: dict[str, Any] = {"ok": True}
            if op == "apply":
                assert version is not None
                results = apply_hours(state, version, decode_hours(request["hours"]), cfg, cache)
                reply = {"results": [result_to_wire(r) for r in results]}
            elif op == "forget":
                if cache is not None:
                    cache.forget(str(request.get("why")))
            elif op != "load":
                raise ValueError(f"unknown request {op!r}")
            if cache is not None:
                reply["cache"] = cache.stats()
        except Exception as exc:  # noqa: BLE001 - reported to the consumer, which raises it
            log.exception("the hour applier failed")
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        write_frame(out, reply)


def main() -> int:
    from streaming.version import load_version
    from twotower.config import load_settings
    from twotower.logs import setup_logging

    _die_with_parent()
    # a SIGTERM or Ctrl-C sent to the whole process group is the consumer's to handle: it
    # finishes the current write, stores positions and then closes our stdin, which ends us
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    setup_logging()
    settings = load_settings()
    state = None

    def load(name: str) -> LoadedVersion:
        nonlocal state
        from jobs.redis_conn import redis_client

        if state is None:
            state = StreamState(redis_client(settings), settings.redis.prefix)
        return load_version(settings, name, state.version_meta(name))

    out = sys.stdout.buffer
    sys.stdout = sys.stderr  # the frames own stdout: a stray print must not corrupt them
    serve(sys.stdin.buffer, out, settings, load)
    return 0


if __name__ == "__main__":
    sys.exit(main())

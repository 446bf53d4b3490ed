"""The incremental consumer through the real (Tansu) broker and the real Redis: bounded runs,
dead letters, exactly-once under kill -9, two members of one group, version switches,
continuous mode and SIGTERM."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from streaming.consumer import run_bounded
from streaming.state import StreamState
from streaming.status import incremental_status
from tests.kafka_fixtures import (  # noqa: F401 - fixtures
    BASE_MS,
    HOUR,
    kafka_broker,
    kafka_settings,
    make_stream,
    produce,
    publish_tiny,
    redis_snapshot,
    write_tiny_artifact,
)

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.kafka, pytest.mark.redis]


def env_for(s, crash: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "PYTHONPATH": str(ROOT),
        "REDIS_URL": s.redis.url,
        "TT_REDIS_PREFIX": s.redis.prefix,
        "KAFKA_BOOTSTRAP_SERVERS": s.kafka.bootstrap_servers,
        "TT_KAFKA_TOPIC": s.kafka.topic,
        "TT_KAFKA_DEAD_LETTER_TOPIC": s.kafka.dead_letter_topic,
        "TT_KAFKA_GROUP_ID": s.kafka.group_id,
        "TT_KAFKA_SESSION_TIMEOUT_MS": str(s.kafka.session_timeout_ms),
        "TT_STATE_DIR": str(s.paths.state_dir),
        "TT_INCREMENTAL_MIN_EVENTS_NEW_USER": str(s.incremental.min_events_new_user),
        "TT_INCREMENTAL_IDLE_PARTITION_S": "0",
        "TT_INCREMENTAL_CHECKPOINT_INTERVAL_S": "1",
        "TT_INCREMENTAL_APPLIER": s.incremental.applier,
        "TT_INCREMENTAL_APPLIER_WORKERS": str(s.incremental.applier_workers),
    })
    env.pop("TT_STREAM_CRASH_AT", None)
    if crash:
        env["TT_STREAM_CRASH_AT"] = crash
    return env


def start_consumer(s, log: Path, mode: str = "bounded", crash: str | None = None) -> subprocess.Popen:
    """The consumer in a session of its own, so a signal can go to its whole process group (as
    a terminal's Ctrl-C or a supervisor's stop does)."""
    return subprocess.Popen(
        [sys.executable, "-m", "streaming.consumer", "--mode", mode],
        cwd=ROOT, env=env_for(s, crash), stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True,
    )


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def assert_same_effect(a: dict, b: dict) -> float:
    """Rows within 1e-6 (returns the max difference), everything else equal."""
    assert a["rows"].keys() == b["rows"].keys()
    worst = 0.0
    for k, (e, w, n) in a["rows"].items():
        e2, w2, n2 = b["rows"][k]
        worst = max(worst, float(np.abs(e - e2).max()))
        assert (w, n) == (w2, n2), k
    assert worst <= 1e-6
    assert a["hists"] == b["hists"]
    assert a["windows"] == b["windows"]
    assert a["other"] == b["other"]
    return worst


@pytest.fixture
def prepared(kafka_settings, redis_client, tmp_path):
    """Topic filled with the seeded stream; version v1 (cutoff = the stream's first hour) published."""
    s = kafka_settings.replace("incremental", min_events_new_user=2, idle_partition_s=0)
    produce(s, make_stream())
    tv = write_tiny_artifact(tmp_path / "artifacts", "v1", BASE_MS)
    publish_tiny(redis_client, s.redis.prefix, tv)
    return s, tv


def with_prefix(s, prefix: str, group: str):
    return s.replace("redis", prefix=prefix).replace("kafka", group_id=group)


def cleanup(client, prefix: str) -> None:
    for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        client.delete(key)


def test_bounded_run_applies_closed_hours_dead_letters_bad_records_and_exits(prepared, redis_client):
    from streaming.clients import make_consumer

    s, tv = prepared
    report = run_bounded(s)
    assert report["status"] == "ok" and report["version"] == "v1"
    assert report["hours_applied"] == 8  # hours 0..7; the tail hour (10) stays open
    assert report["open_hours"] == [BASE_MS + 10 * HOUR]
    assert report["dead_letters"] == 6 and report["lag"] == 0
    state = StreamState(redis_client, s.redis.prefix)
    assert state.applied_windows("v1") == [BASE_MS + h * HOUR for h in range(8)]
    assert sum(state.window_counts("v1", BASE_MS + h * HOUR)["users"] for h in range(8)) == report["users_updated"]

    status = incremental_status(s, redis_client)
    last = state.window_counts("v1", BASE_MS + 7 * HOUR)
    assert status["version"] == "v1" and status["dead_letters"] == 6
    assert status["last_window"] == BASE_MS + 7 * HOUR
    assert (status["users_updated"], status["events_applied"]) == (last["users"], last["events"])
    assert status["consumer_lag"] == {0: 0, 1: 0, 2: 0, 3: 0}
    assert status["watermark"] == BASE_MS + 10 * HOUR - s.incremental.allowed_lateness_s * 1000
    assert abs(status["last_publish_at"] - time.time() * 1000) < 120_000

    # events before the cutoff are the nightly's: no row records an hour before it
    for key in redis_client.scan_iter(match=f"{s.redis.prefix}:row:v1:*"):
        assert int(redis_client.hget(key, "w")) in [-1] + [BASE_MS + h * HOUR for h in range(8)]

    # the dead-letter topic holds each bad record once, with its reason in value and headers
    dlq = make_consumer(s.kafka, s.kafka.dead_letter_topic, group_id=None, consumer_timeout_ms=3000)
    records = [r for r in dlq]
    dlq.close()
    reasons = sorted(json.loads(r.value)["reason"] for r in records)
    assert reasons == sorted(["not_json", "bad_ts", "missing_field", "key_mismatch", "bad_weight", "not_object"])
    for r in records:
        headers = dict(r.headers)
        assert headers["reason"].decode() == json.loads(r.value)["reason"]
        assert headers["source_topic"].decode() == s.kafka.topic
    assert any(json.loads(r.value).get("payload") == "not json" for r in records)

    # a second bounded run has nothing new: it changes no row and sends no dead letter again
    rows_before = redis_snapshot(redis_client, s.redis.prefix, "v1")
    again = run_bounded(s)
    assert again["hours_applied"] == 0 and again["rows_written"] == 0
    assert_same_effect(rows_before, redis_snapshot(redis_client, s.redis.prefix, "v1"))
    dlq = make_consumer(s.kafka, s.kafka.dead_letter_topic, group_id=None, consumer_timeout_ms=2000)
    assert len(list(dlq)) == 6
    dlq.close()


def test_both_applier_kinds_write_the_same_rows(prepared, redis_client, caplog):
    """The worker-process applier (streaming.applier), one worker and two sharing the
    partitions, against the in-process thread: the same stream, the same Redis effect, bitwise;
    and each keeps what it wrote in its user cache. None holds kafka-python's network thread in
    a rebalance callback (the workers' start overlaps the join)."""
    s, tv = prepared
    runs = {}
    kinds = {"thread": ("thread", 1), "process": ("process", 1), "process2": ("process", 2)}
    try:
        for kind, (applier, workers) in kinds.items():
            k = with_prefix(s, f"{s.redis.prefix}-{kind}", f"{s.kafka.group_id}-{kind}")
            k = k.replace("incremental", applier=applier, applier_workers=workers)
            publish_tiny(redis_client, k.redis.prefix, tv)
            with caplog.at_level(logging.WARNING, logger="kafka.coordinator.consumer"):
                report = run_bounded(k)
            assert "Rebalance listener" not in caplog.text
            assert report["hours_applied"] == 8 and report["status"] == "ok"
            assert report["cached_users"]["size"] > 0
            runs[kind] = redis_snapshot(redis_client, k.redis.prefix, "v1")
        assert assert_same_effect(runs["thread"], runs["process"]) == 0.0
        assert assert_same_effect(runs["thread"], runs["process2"]) == 0.0
    finally:
        for kind in kinds:
            cleanup(redis_client, f"{s.redis.prefix}-{kind}")


def test_a_revoke_of_nothing_does_not_wait_for_the_applier(kafka_settings, redis_client):
    """kafka-python calls the revoke callback on its network thread before every join, the
    first one included, with nothing revoked. Asking the applier to forget users then would
    wait for a worker process still importing and loading the version (about 3 s in the stream
    benchmark), with heartbeats held back."""
    from kafka import TopicPartition

    from streaming.consumer import IncrementalConsumer

    consumer = IncrementalConsumer(kafka_settings, None, None, redis_client)
    asked: list[str] = []
    consumer._applier = SimpleNamespace(forget_users=asked.append)
    consumer.on_revoked(set())
    assert asked == []
    consumer.on_revoked({TopicPartition(kafka_settings.kafka.topic, 1)})
    assert asked == ["partitions revoked"]


def test_a_revoke_with_batches_in_flight_stores_their_positions_without_a_kafka_call(kafka_settings, redis_client):
    """A member revoked while batches are in flight (a second member joining mid-run) finishes
    them and stores their positions in Redis from the revoke callback, which kafka-python runs
    on its network thread and where it refuses any blocking consumer call: the offset commit
    raised there and failed the run (seen in the stream benchmark's group path). The commit is
    left to the owners' next one; the loop's own batches still commit."""
    from concurrent.futures import Future

    from kafka import TopicPartition

    from streaming.consumer import InFlight, IncrementalConsumer
    from streaming.hour import HourResult
    from streaming.windows import Checkpoint, PartitionTracker

    on_network_thread = [False]
    committed: list[dict] = []

    class NetworkThreadGuard:
        """kafka-python 3's KafkaConsumer as far as the positions need it."""

        def commit(self, offsets):
            if on_network_thread[0]:
                raise RuntimeError("Cannot block on net.run() from the IO thread itself.")
            committed.append(offsets)

        def highwater(self, tp):
            return 90

    consumer = IncrementalConsumer(kafka_settings, NetworkThreadGuard(), None, redis_client)
    consumer.version = SimpleNamespace(version="v1")
    consumer._applier = SimpleNamespace(forget_users=lambda why: None)
    state = StreamState(redis_client, kafka_settings.redis.prefix)
    try:
        for p in (0, 1):
            consumer.trackers[p] = PartitionTracker.from_checkpoint(p, Checkpoint(offset=10))

        def batch(offset: int, hour: int) -> InFlight:
            done: Future = Future()
            done.set_result([HourResult(hour, users_updated=1)])
            return InFlight(done, {p: Checkpoint(offset=offset, applied_through=hour) for p in (0, 1)}, 0)

        consumer._inflight.extend([batch(40, BASE_MS), batch(60, BASE_MS + HOUR)])
        on_network_thread[0] = True
        consumer.on_revoked({TopicPartition(kafka_settings.kafka.topic, 1)})
        on_network_thread[0] = False
        assert not consumer._inflight and consumer.report.hours_applied == 2
        stored = state.load_checkpoints("v1")
        assert stored[1].offset == 60 and stored[0].offset == 60  # both batches' positions, in order
        assert committed == [] and sorted(consumer.trackers) == [0]

        consumer._inflight.append(batch(80, BASE_MS + 2 * HOUR))
        consumer._collect()  # the loop's own wait: positions stored and committed
        assert state.load_checkpoints("v1")[0].offset == 80
        assert [{tp.partition: o.offset for tp, o in c.items()} for c in committed] == [{0: 80}]
    finally:
        cleanup(redis_client, kafka_settings.redis.prefix)


@pytest.mark.parametrize("workers", [0, 2], ids=["thread-applier", "two-worker-processes"])
def test_kill_9_at_any_point_leaves_redis_as_an_uninterrupted_run(prepared, redis_client, tmp_path, workers):
    """Killed at each named point of an hour's apply (in the worker processes when there are
    some: either one's death takes the consumer down) and from outside, then run to the end."""
    s, tv = prepared
    if workers:
        s = s.replace("incremental", applier="process", applier_workers=workers)
    ref = with_prefix(s, s.redis.prefix + "-ref", s.kafka.group_id + "-ref")
    crash = with_prefix(s, s.redis.prefix + "-crash", s.kafka.group_id + "-crash")
    try:
        publish_tiny(redis_client, ref.redis.prefix, tv)
        publish_tiny(redis_client, crash.redis.prefix, tv)
        reference = run_bounded(ref)
        assert reference["hours_applied"] == 8

        log = tmp_path / "consumer.log"
        outcomes = []
        # 1-3: killed by the process itself at the named points of an hour's apply
        # (positions are stored once per batch of closed hours, so the first checkpoint is the one)
        for point in ("mid_rows:1", "after_rows:1", "after_checkpoint:1"):
            proc = start_consumer(crash, log, crash=point)
            outcomes.append(proc.wait(120))
        # 4: killed from outside as soon as it owns the partitions (reading or applying; the
        # tiny stream may also be done by then, and the kill finds a finished process)
        start = log.stat().st_size
        proc = start_consumer(crash, log)
        wait_for(lambda: b"assigned partitions" in log.read_bytes()[start:] or proc.poll() is not None, 60, "partition assignment")
        proc.send_signal(signal.SIGKILL)
        outcomes.append(proc.wait(60))
        # 5: runs to the end
        proc = start_consumer(crash, log)
        outcomes.append(proc.wait(120))
        text = log.read_text()
        assert outcomes[0:3] == [-signal.SIGKILL] * 3, (outcomes, text[-3000:])
        assert outcomes[3] in (0, -signal.SIGKILL), (outcomes, text[-3000:])
        assert outcomes[-1] == 0, text[-3000:]
        applied = re.findall(r"hour (\S+ \S+) UTC applied to version v1: (\d+) users updated \(\d+ new, (\d+) rows written now", text)
        assert len({h for h, _, _ in applied}) == 8  # every hour was applied by one run or another
        # the hour killed after its rows was replayed without writing anything; the one killed
        # half-way was finished by writing only the rest
        assert any(int(written) == 0 for _, _, written in applied), text[-3000:]
        assert any(0 < int(written) < int(users) for _, users, written in applied), text[-3000:]

        worst = assert_same_effect(redis_snapshot(redis_client, ref.redis.prefix, "v1"),
                                   redis_snapshot(redis_client, crash.redis.prefix, "v1"))
        assert worst == 0.0  # in fact bitwise equal
        final = json.loads(text.strip().splitlines()[-1])
        assert final["status"] == "ok" and final["lag"] == 0
    finally:
        cleanup(redis_client, ref.redis.prefix)
        cleanup(redis_client, crash.redis.prefix)


@pytest.mark.parametrize("crash", [None, "mid_rows:1"])
def test_two_members_of_one_group_split_the_partitions_and_leave_redis_as_one_consumer(prepared, redis_client, tmp_path, crash):
    """DESIGN §8's scale-out: two consumer processes in one group share the four partitions
    (users are keyed, so each member owns its users' rows) and together leave Redis as one
    consumer reading everything does: hours, histories, counters and checkpoints equal, rows
    bit for bit (an hour's users are cut into blocks per partition, so the update's arithmetic
    does not depend on which member computes them). With ``crash``, the first member kills
    itself (SIGKILL) half-way through writing its first batch; the second takes its partitions
    over in the rebalance and finishes them, and Redis is still the same, bit for bit.
    The pair reads a topic of its own, filled only once each member owns two partitions, so
    both do their share whatever order they joined in."""
    from infra.kafka_topics import ensure_topics, project_topics
    from streaming.clients import make_admin

    s, tv = prepared
    one = with_prefix(s, s.redis.prefix + "-one", s.kafka.group_id + "-one")
    pair = with_prefix(s, s.redis.prefix + "-pair", s.kafka.group_id + "-pair")
    pair = pair.replace("kafka", topic=s.kafka.topic + "-pair", dead_letter_topic=s.kafka.topic + "-pair.dlq")
    logs = [tmp_path / "member-a.log", tmp_path / "member-b.log"]
    procs: list[subprocess.Popen] = []

    def owned() -> list[set[int]]:
        """Each member's partitions as of its latest assignment."""
        out = []
        for log in logs:
            assigned = re.findall(r"assigned partitions \[([\d, ]*)\]", log.read_text() if log.exists() else "")
            out.append({int(p) for p in assigned[-1].split(",") if p.strip()} if assigned else set())
        return out

    try:
        publish_tiny(redis_client, one.redis.prefix, tv)
        publish_tiny(redis_client, pair.redis.prefix, tv)
        assert run_bounded(one)["hours_applied"] == 8
        admin = make_admin(pair.kafka)
        try:
            ensure_topics(admin, project_topics(pair.kafka))
        finally:
            admin.close()
        procs = [start_consumer(pair, logs[0], mode="continuous", crash=crash), start_consumer(pair, logs[1], mode="continuous")]
        def split_two_ways() -> bool:
            a, b = owned()
            return len(a) == len(b) == 2 and a | b == {0, 1, 2, 3}

        wait_for(split_two_ways, 90, "two members owning two partitions each")
        produce(pair, make_stream())
        state = StreamState(redis_client, pair.redis.prefix)
        hour_7 = BASE_MS + 7 * HOUR
        wait_for(lambda: sorted(state.load_checkpoints("v1")) == [0, 1, 2, 3]
                 and all(c.applied_through == hour_7 for c in state.load_checkpoints("v1").values()), 90, "every partition's checkpoint past hour 7")
        survivors = [proc for proc in procs if proc.poll() is None]
        for proc in survivors:
            os.killpg(proc.pid, signal.SIGTERM)
        outcomes = [proc.wait(60) for proc in procs]
        texts = [log.read_text() for log in logs]
        if crash is None:
            assert outcomes == [0, 0], [t[-2000:] for t in texts]
        else:  # the second member ended up owning every partition
            assert outcomes == [-signal.SIGKILL, 0] and owned()[1] == {0, 1, 2, 3}, [t[-2000:] for t in texts]
        reports = [json.loads(t.strip().splitlines()[-1]) for t, code in zip(texts, outcomes) if code == 0]
        assert all(r["records_read"] > 0 and r["hours_applied"] > 0 for r in reports), reports
        # each window's start on the wall clock (the group benchmark joins the members' windows)
        assert all(abs(r["first_record_at_ms"] / 1000 - time.time()) < 300 for r in reports), reports

        worst = assert_same_effect(redis_snapshot(redis_client, one.redis.prefix, "v1"),
                                   redis_snapshot(redis_client, pair.redis.prefix, "v1"))
        assert worst == 0.0  # bitwise: an hour's blocks are cut per partition (streaming.update.run_jobs)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        cleanup(redis_client, one.redis.prefix)
        cleanup(redis_client, pair.redis.prefix)


def test_new_version_replays_from_its_cutoff_into_its_own_rows(prepared, redis_client, tmp_path):
    s, tv1 = prepared
    run_bounded(s)  # v1 absorbs hours 0..7
    v1_rows = redis_snapshot(redis_client, s.redis.prefix, "v1")["rows"]
    cutoff = BASE_MS + 4 * HOUR
    tv2 = write_tiny_artifact(tmp_path / "artifacts2", "v2", cutoff, seed=1)
    publish_tiny(redis_client, s.redis.prefix, tv2)

    report = run_bounded(s)
    assert report["version"] == "v2" and report["hours_applied"] == 4
    state = StreamState(redis_client, s.redis.prefix)
    assert state.applied_windows("v2") == [BASE_MS + h * HOUR for h in range(4, 8)]
    for h in range(4, 8):  # the same hours hold the same events, whatever version absorbs them
        c1, c2 = state.window_counts("v1", BASE_MS + h * HOUR), state.window_counts("v2", BASE_MS + h * HOUR)
        assert (c1["users"], c1["events"], c1["unknown"]) == (c2["users"], c2["events"], c2["unknown"])
    assert redis_snapshot(redis_client, s.redis.prefix, "v1")["rows"].keys() == v1_rows.keys()  # v1 left alone

    # reference: v2 published alone on a fresh prefix whose histories are already complete (as
    # the nightly publish leaves them), consumed from scratch: the switched rows must match it
    ref = with_prefix(s, s.redis.prefix + "-v2ref", s.kafka.group_id + "-v2ref")
    try:
        for key in redis_client.scan_iter(match=f"{s.redis.prefix}:hist:*"):
            redis_client.restore(ref.redis.prefix + key.decode()[len(s.redis.prefix):], 0, redis_client.dump(key))
        publish_tiny(redis_client, ref.redis.prefix, tv2)
        assert run_bounded(ref)["hours_applied"] == 4
        switched = redis_snapshot(redis_client, s.redis.prefix, "v2")["rows"]
        fresh = redis_snapshot(redis_client, ref.redis.prefix, "v2")["rows"]
        assert switched.keys() == fresh.keys()
        for k, (e, w, n) in switched.items():
            e2, w2, n2 = fresh[k]
            assert np.array_equal(e, e2) and (w, n) == (w2, n2), k
        assert any(w >= cutoff for _, w, _ in switched.values())
    finally:
        cleanup(redis_client, ref.redis.prefix)


@pytest.mark.parametrize("applier,workers", [("thread", 1), ("process", 1), ("process", 2)])
def test_continuous_mode_follows_a_version_switch_and_stops_cleanly_on_sigterm(prepared, redis_client, tmp_path, applier, workers):
    s, tv1 = prepared
    s = s.replace("incremental", applier=applier, applier_workers=workers)
    state = StreamState(redis_client, s.redis.prefix)
    log = tmp_path / "continuous.log"
    proc = start_consumer(s, log, mode="continuous")
    try:
        wait_for(lambda: len(state.applied_windows("v1")) == 8, 90, "v1 to absorb the 8 closed hours")
        tv2 = write_tiny_artifact(tmp_path / "artifacts2", "v2", BASE_MS + 6 * HOUR, seed=1)
        publish_tiny(redis_client, s.redis.prefix, tv2)
        wait_for(lambda: len(state.applied_windows("v2")) == 2, 60, "v2 to replay the hours since its cutoff")
        assert proc.poll() is None  # still running: continuous
        os.killpg(proc.pid, signal.SIGTERM)  # the whole group: the worker applier, if any, gets it too
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "model version moved from v1 to v2" in text and "stop requested" in text
    report = json.loads(text.strip().splitlines()[-1])
    assert report["mode"] == "continuous" and report["version"] == "v2"
    ckpt = state.load_checkpoints("v2")
    assert sorted(ckpt) == [0, 1, 2, 3] and all(c.applied_through == BASE_MS + 7 * HOUR for c in ckpt.values())
    assert incremental_status(s, redis_client)["version"] == "v2"

"""Redis restarted (SIGKILL, then started again on the same data) in the middle of a nightly
publish and in the middle of the incremental consumer's writes: the clients retry with
exponential backoff, nothing is lost or applied twice, and the serving pointer never names a
version that is not completely written. The server is a throwaway redis-server with an
append-only file (fsync always), like a production Redis with AOF; the developer's Redis on
6379 is only used for the reference run."""

from __future__ import annotations

import json
import shutil
import signal
import threading
import time

import pytest
import redis

from jobs.publish import publish_version
from jobs.redis_conn import ResilientRedis, redis_client
from streaming.consumer import run_bounded
from streaming.state import StreamState
from tests.faults.infra import kill_if_running
from tests.kafka_fixtures import BASE_MS, make_stream, produce, publish_tiny, redis_snapshot, write_tiny_artifact
from tests.publish_fixtures import clone_version, tiny_settings, tiny_version
from tests.test_publish import expected_rows
from tests.test_stream_consumer import assert_same_effect, cleanup, start_consumer, wait_for, with_prefix
from twotower import redis_keys

pytestmark = [pytest.mark.faults, pytest.mark.redis]

DAY_MS = 86_400_000
DOWN_S = 1.0


@pytest.fixture(scope="module")
def base_version(tmp_path_factory):
    """One trained and indexed tiny version (no Spark), copied per test."""
    from twotower.config import load_settings

    root = tmp_path_factory.mktemp("restart_base")
    return tiny_version(tiny_settings(load_settings().replace("paths", state_dir=root / "state")))


class PointerWatch(threading.Thread):
    """Reads the pointer every few ms while a publish runs and records any moment where the
    version it names is not completely written (metadata missing or fewer rows than users)."""

    def __init__(self, url: str, prefix: str, n_users: int):
        super().__init__(daemon=True)
        self.client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
        self.prefix, self.n_users = prefix, n_users
        self.stop = threading.Event()
        self.samples, self.unreachable, self.violations = 0, 0, []

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                current = self.client.hget(redis_keys.pointer(self.prefix), "current")
                if current:
                    v = current.decode()
                    rows = sum(1 for _ in self.client.scan_iter(match=f"{self.prefix}:row:{v}:*", count=1000))
                    if not self.client.exists(redis_keys.version_meta(self.prefix, v)) or rows < self.n_users:
                        self.violations.append((v, rows))
                self.samples += 1
            except redis.RedisError:
                self.unreachable += 1
            time.sleep(0.003)


def test_pipeline_reloads_lua_scripts_a_restarted_redis_forgot(redis_server):
    """The failure a retried pipeline meets after a restart, made deterministic: the script
    cache is flushed between redis-py loading the scripts and running the pipeline."""
    from redis.client import Pipeline

    flusher = redis.Redis.from_url(redis_server.url)
    original = Pipeline.load_scripts
    flushed = []

    def load_then_forget(self):
        original(self)
        if not flushed:
            flusher.script_flush()
            flushed.append(True)

    for cls, survives in ((redis.Redis, False), (ResilientRedis, True)):
        client = cls.from_url(redis_server.url)
        incr = client.register_script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
        flushed.clear()
        Pipeline.load_scripts = load_then_forget
        try:
            pipe = client.pipeline(transaction=False)
            incr(keys=["n"], args=[5], client=pipe)
            pipe.set("plain", 1)
            incr(keys=["n"], args=[7], client=pipe)
            if survives:
                assert pipe.execute() == [5, True, 12]
            else:
                with pytest.raises(redis.exceptions.NoScriptError):
                    pipe.execute()
        finally:
            Pipeline.load_scripts = original
        client.delete("n", "plain")
        client.close()


def test_nightly_publish_survives_a_redis_restart_and_never_exposes_a_half_written_version(settings, base_version, redis_server, caplog):
    artifact, prepared = base_version
    shutil.copytree(prepared, settings.paths.prepared_dir / prepared.name)
    shutil.copytree(artifact, settings.paths.artifacts_dir / artifact.name)
    s = tiny_settings(settings).replace("redis", url=redis_server.url, batch_size=4)
    v1 = settings.paths.artifacts_dir / artifact.name
    cutoff = json.loads((v1 / "manifest.json").read_text())["data_cutoff_ms"]
    v2 = clone_version(v1, "20240131-00000002", cutoff + DAY_MS, row_scale=2.0)
    client = redis_client(s)
    assert publish_version(s, v1, client=client)["switched"] is True
    n_users = len(expected_rows(v2))

    watch = PointerWatch(redis_server.url, s.redis.prefix, n_users)
    watch.start()
    restarter: list[threading.Thread] = []

    def restart_after_second_batch(batch: int, done: int) -> None:
        if batch == 2:
            restarter.append(redis_server.restart_in_background(DOWN_S))

    t0 = time.monotonic()
    try:
        result = publish_version(s, v2, client=client, on_batch=restart_after_second_batch)
    finally:
        watch.stop.set()
        watch.join(5)
    took = time.monotonic() - t0
    restarter[0].join(10)
    assert redis_server.restarts == 1 and took >= DOWN_S  # it really waited the outage out
    assert any("did not answer" in r.getMessage() and "retry 1 of" in r.getMessage() for r in caplog.records)
    assert result["switched"] is True and result["previous"] == v1.name
    assert result["rows_written"] + result["rows_kept"] == n_users
    # the watcher saw the pointer on both sides of the outage (how many times depends on how
    # busy the machine is: each sample scans the version's rows)
    assert watch.violations == [] and watch.samples >= 3 and watch.unreachable > 0
    ptr = {k.decode(): v.decode() for k, v in client.hgetall(redis_keys.pointer(s.redis.prefix)).items()}
    assert (ptr["current"], ptr["previous"]) == (v2.name, v1.name)
    for version in (v1, v2):  # both complete and exact: the new one and the one kept for rollback
        for user_id, row in expected_rows(version).items():
            assert client.hget(redis_keys.user_row(s.redis.prefix, version.name, user_id), "e") == row
    client.close()


def test_consumer_survives_redis_restarts_mid_write(kafka_settings, redis_server, redis_client, tmp_path):
    """Two restarts while the consumer writes hours; it never exits, and Redis ends up as after
    an uninterrupted run (the reference runs on the developer's Redis under its own prefix)."""
    s = kafka_settings.replace("incremental", min_events_new_user=2, idle_partition_s=0)
    s = s.replace("redis", url=redis_server.url)
    ref = with_prefix(kafka_settings, s.redis.prefix + "-ref", s.kafka.group_id + "-ref")
    ref = ref.replace("incremental", min_events_new_user=2, idle_partition_s=0)
    tv = write_tiny_artifact(tmp_path / "artifacts", "v1", BASE_MS)
    private = redis.Redis.from_url(redis_server.url)
    publish_tiny(private, s.redis.prefix, tv)
    publish_tiny(redis_client, ref.redis.prefix, tv)
    stream = make_stream(n_hours=24, n_events=1200, seed=5)
    thirds = [stream[: len(stream) // 3], stream[len(stream) // 3 : 2 * len(stream) // 3], stream[2 * len(stream) // 3 :]]
    log = tmp_path / "consumer.log"
    proc = None
    try:
        produce(s, thirds[0])
        proc = start_consumer(s, log, mode="continuous")
        state = StreamState(private, s.redis.prefix)
        wait_for(lambda: proc.poll() is not None or _applied(state) >= 1, 120, "the first hours applied")
        for part in thirds[1:]:
            before = _applied(state)
            restarting = redis_server.restart_in_background(2 * DOWN_S)  # down now, back in 2 s...
            produce(s, part)  # ...while the consumer reads these records and writes their hours
            restarting.join(10)
            wait_for(lambda: proc.poll() is not None or _applied(state) > before, 120, "hours applied after the restart")
            assert proc.poll() is None, log.read_text()[-3000:]
        reference = run_bounded(ref)
        wait_for(lambda: proc.poll() is not None or _applied(state) == reference["hours_applied"], 120, "every closed hour")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()[-3000:]
        assert redis_server.restarts == 2
        assert "did not answer" in log.read_text()  # it met the outage, retried, and said so
        assert_same_effect(redis_snapshot(redis_client, ref.redis.prefix, "v1"), redis_snapshot(private, s.redis.prefix, "v1"))
    finally:
        kill_if_running(proc)
        cleanup(redis_client, ref.redis.prefix)
        private.close()


def _applied(state: StreamState) -> int:
    try:
        return len(state.applied_windows("v1"))
    except redis.RedisError:
        return -1

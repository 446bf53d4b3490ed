"""``python -m infra.local up|down|status``: the local broker and topics, on a private port."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from infra.local import down, listening, local_broker_address, parse_host_port, read_pid_file, status, up
from infra.kafka_topics import existing_partitions
from tests.kafka_fixtures import _free_port

ROOT = Path(__file__).resolve().parents[1]


def test_addresses():
    assert parse_host_port("127.0.0.1:9092") == ("127.0.0.1", 9092)
    assert parse_host_port("localhost") == ("localhost", 9092)
    assert parse_host_port("[::1]:19092") == ("::1", 19092)
    from twotower.config import KafkaConfig

    assert local_broker_address(KafkaConfig(bootstrap_servers="localhost:9093")) == ("127.0.0.1", 9093)
    assert local_broker_address(KafkaConfig(bootstrap_servers="127.0.0.1:9092,127.0.0.1:9093")) == ("127.0.0.1", 9092)
    assert local_broker_address(KafkaConfig(bootstrap_servers="kafka-0.prod:9092")) is None
    assert local_broker_address(KafkaConfig(bootstrap_servers="127.0.0.1:9092,kafka-1.prod:9092")) is None


def test_up_is_idempotent_and_down_stops_what_up_started(settings):
    from streaming.clients import make_admin

    port = _free_port()
    s = settings.replace("kafka", bootstrap_servers=f"127.0.0.1:{port}", topic="events-x", dead_letter_topic="events-x.dlq", partitions=3)
    try:
        # the exact CLI the Makefile runs
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TT_STATE_DIR": str(s.paths.state_dir),
               "KAFKA_BOOTSTRAP_SERVERS": s.kafka.bootstrap_servers, "TT_KAFKA_TOPIC": "events-x",
               "TT_KAFKA_DEAD_LETTER_TOPIC": "events-x.dlq", "TT_KAFKA_PARTITIONS": "3"}
        out = subprocess.run([sys.executable, "-m", "infra.local", "up"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert "started Tansu" in out.stdout and "(created)" in out.stdout
        first = read_pid_file(s.paths.state_dir / "infra")
        assert first is not None and listening("127.0.0.1", port)
        assert (s.paths.state_dir / "infra" / "tansu.log").exists()

        again = up(s)
        assert again["broker"].startswith("already listening") and "(created)" not in str(again["topics"])
        assert read_pid_file(s.paths.state_dir / "infra").pid == first.pid
        admin = make_admin(s.kafka)
        assert existing_partitions(admin, ["events-x", "events-x.dlq"]) == {"events-x": 3, "events-x.dlq": 3}
        admin.close()
        assert "listening" in status(s)["broker"]

        stopped = down(s)
        assert f"stopped Tansu pid {first.pid}" in stopped["broker"]
        assert not listening("127.0.0.1", port)
        assert read_pid_file(s.paths.state_dir / "infra") is None
        assert "no broker" in down(s)["broker"]
    finally:
        down(s)


def test_remote_bootstrap_starts_nothing_and_missing_redis_is_explained(settings):
    bad = settings.replace("redis", url="redis://127.0.0.1:1/0")
    with pytest.raises(RuntimeError, match="Redis does not answer at redis://127.0.0.1:1/0"):
        up(bad)
    remote = settings.replace("kafka", bootstrap_servers="kafka-0.example.invalid:9092")
    assert status(remote)["broker"] == "remote: kafka-0.example.invalid:9092"
    assert not (settings.paths.state_dir / "infra" / "tansu.json").exists()

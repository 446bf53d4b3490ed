"""Fixtures of the fault-injection suite (``make test-faults``): a private redis-server to kill,
a Kafka broker behind a proxy to cut, and the seeded stream and tiny version the consumer
cases share. The broker, Redis and Spark are the real ones; only the faults are injected."""

from __future__ import annotations

import uuid

import pytest

from tests.faults.infra import RedisServer, TcpProxy, free_port, start_advertising_broker
from tests.kafka_fixtures import SESSION_TIMEOUT_MS, kafka_broker, kafka_settings  # noqa: F401 - fixtures


def pytest_configure(config):
    config.addinivalue_line("markers", "faults: fault-injection suite (make test-faults): kills, restarts, outages, bad input")


@pytest.fixture
def redis_server(tmp_path):
    """A throwaway redis-server (AOF, fsync always) on a free port; stopped afterwards."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def proxied_broker(tmp_path):
    """A private Tansu broker that clients reach only through a TCP proxy (which the test can
    take down); yields (proxy, bootstrap address). The proxy starts DOWN."""
    from infra.local import stop_broker

    broker_port = free_port()
    proxy = TcpProxy(("127.0.0.1", broker_port))
    run_dir = tmp_path / "tansu"
    # the broker advertises the proxy's address, so every connection (metadata, fetch, group
    # coordinator) goes through the proxy
    broker = start_advertising_broker(broker_port, proxy.port, run_dir)
    yield proxy, f"127.0.0.1:{proxy.port}"
    proxy.down()
    stop_broker(broker, run_dir)


@pytest.fixture
def proxied_settings(settings, proxied_broker):
    """``settings`` on the proxied broker with this test's own topics and group (proxy up for
    the topic creation, then down again)."""
    from infra.kafka_topics import ensure_topics, project_topics
    from streaming.clients import make_admin

    proxy, bootstrap = proxied_broker
    tag = uuid.uuid4().hex[:8]
    s = settings.replace("kafka", bootstrap_servers=bootstrap, topic=f"t-{tag}", dead_letter_topic=f"t-{tag}.dlq",
                         group_id=f"g-{tag}", session_timeout_ms=SESSION_TIMEOUT_MS)  # fmt: skip
    proxy.up()
    admin = make_admin(s.kafka)
    try:
        ensure_topics(admin, project_topics(s.kafka))
    finally:
        admin.close()
    proxy.down()
    return s

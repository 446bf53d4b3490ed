"""The Kafka broker unreachable when the consumer starts, and lost again mid-stream: the
consumer waits (saying so in its log), carries on when the broker is back, and Redis ends up
exactly as after an uninterrupted run. The broker is the real Tansu binary; the outage is a TCP
proxy in front of it going down (connections reset, new ones refused), as in a network
partition. Tansu keeps its log in memory only, so a broker *restart* would lose the topic;
against a production Kafka that is the same outage as seen from the client."""

from __future__ import annotations

import signal
import time

import pytest

from streaming.consumer import run_bounded
from streaming.state import StreamState
from tests.faults.infra import kill_if_running
from tests.kafka_fixtures import BASE_MS, make_stream, produce, publish_tiny, redis_snapshot, write_tiny_artifact
from tests.test_stream_consumer import assert_same_effect, cleanup, start_consumer, wait_for, with_prefix

pytestmark = [pytest.mark.faults, pytest.mark.kafka, pytest.mark.redis]

N_HOURS = 12
OUTAGE_S = 8.0  # several session timeouts: the broker drops the member, it must rejoin


def test_consumer_waits_for_the_broker_and_survives_losing_it_mid_stream(proxied_settings, proxied_broker, redis_client, tmp_path):
    proxy, _ = proxied_broker
    s = proxied_settings.replace("incremental", min_events_new_user=2, idle_partition_s=0)
    ref = with_prefix(s, s.redis.prefix + "-ref", s.kafka.group_id + "-ref")
    tv = write_tiny_artifact(tmp_path / "artifacts", "v1", BASE_MS)
    publish_tiny(redis_client, s.redis.prefix, tv)
    publish_tiny(redis_client, ref.redis.prefix, tv)
    stream = make_stream(n_hours=N_HOURS, n_events=900)
    first, second = stream[: len(stream) // 2], stream[len(stream) // 2 :]
    state = StreamState(redis_client, s.redis.prefix)
    log = tmp_path / "consumer.log"
    proc = None
    try:
        # 1. the broker is unreachable at start: the consumer waits and says what for
        proc = start_consumer(s, log, mode="continuous")
        wait_for(lambda: log.read_text().count("waiting for the Kafka broker") >= 3 or proc.poll() is not None, 90, "three logged connection attempts")
        assert proc.poll() is None, log.read_text()[-3000:]
        proxy.up()
        produce(s, first)
        wait_for(lambda: len(state.applied_windows("v1")) >= 2 or proc.poll() is not None, 120, "hours applied once the broker is reachable")

        # 2. the broker is lost mid-stream, for longer than the group session
        proxy.down()
        outage_from = len(log.read_text())
        time.sleep(OUTAGE_S)
        assert proc.poll() is None, log.read_text()[-3000:]
        applied_during_outage = len(state.applied_windows("v1"))
        proxy.up()
        produce(s, second)
        wait_for(lambda: len(state.applied_windows("v1")) == N_HOURS or proc.poll() is not None, 180, "every closed hour applied")
        assert proc.poll() is None, log.read_text()[-3000:]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()[-3000:]
        text = log.read_text()
        assert "the Kafka broker answers again" in text  # after the wait at start
        assert "Traceback" not in text[outage_from:]  # the outage was waited out, not crashed through

        # 3. the same effect as an uninterrupted run over the same log
        reference = run_bounded(ref)
        assert reference["hours_applied"] == N_HOURS
        assert applied_during_outage < N_HOURS
        assert_same_effect(redis_snapshot(redis_client, ref.redis.prefix, "v1"), redis_snapshot(redis_client, s.redis.prefix, "v1"))
    finally:
        kill_if_running(proc)
        cleanup(redis_client, ref.redis.prefix)


def test_broker_watch_reports_loss_and_return_in_words(proxied_broker, proxied_settings, caplog):
    """The helper a long-running client calls in its loop (streaming.clients.BrokerWatch)."""
    import logging

    from streaming.clients import BrokerWatch

    proxy, _ = proxied_broker
    caplog.set_level(logging.INFO, logger="streaming.clients")
    watch = BrokerWatch(proxied_settings.kafka, "incremental consumer", every_s=1.0, remind_s=30.0)
    proxy.up()
    assert watch.check(now=0.0) is True and caplog.text == ""
    proxy.down()
    assert watch.check(now=0.5) is True  # rate-limited: not probed yet
    assert watch.check(now=1.0) is False
    assert watch.check(now=2.0) is False  # one line per outage, not one per probe
    assert watch.check(now=31.0) is False  # then a reminder
    proxy.up()
    assert watch.check(now=40.0) is True
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines
    assert lines[0].startswith("incremental consumer lost the Kafka broker") and "positions are stored in Redis" in lines[0]
    assert "still no Kafka broker" in lines[1] and "after 30s" in lines[1]
    assert "answers again after 39s" in lines[2]

"""streaming.fetch_race: kafka-python's poll no longer sleeps 100 ms with a fetch response buffered."""

from __future__ import annotations

import collections
import logging
import time
from types import SimpleNamespace

import pytest

from streaming.fetch_race import idle_unless_buffered, mend_idle_race
from tests.kafka_fixtures import BASE_MS, Record, kafka_broker, kafka_settings, produce  # noqa: F401 - fixtures


def test_idle_only_when_nothing_is_buffered():
    assert idle_unless_buffered(True, collections.deque()) is True
    assert idle_unless_buffered(True, collections.deque(["a completed fetch"])) is False
    assert idle_unless_buffered(False, collections.deque()) is False


def test_the_mend_corrects_only_the_idle_flag():
    answers = [({}, True), ({"tp": ["r"]}, False), ({}, True)]
    fetcher = SimpleNamespace(_completed_fetches=collections.deque(["buffered"]))
    fetcher.fetch_records = lambda max_records=None, update_offsets=True, timeout_ms=None: answers.pop(0)
    assert mend_idle_race(SimpleNamespace(_fetcher=fetcher))
    assert fetcher.fetch_records(5, timeout_ms=0) == ({}, False)  # a response waits: poll looks again
    assert fetcher.fetch_records(5) == ({"tp": ["r"]}, False)
    fetcher._completed_fetches.clear()
    assert fetcher.fetch_records(5) == ({}, True)  # truly idle: kafka-python's own back-off stands


def test_a_kafka_python_without_those_internals_is_left_as_it_is(caplog):
    consumer = SimpleNamespace(_fetcher=SimpleNamespace(fetch_records=lambda *a, **k: ({}, True)))
    with caplog.at_level(logging.WARNING, logger="streaming.fetch_race"):
        assert not mend_idle_race(consumer)
    assert "may stall 100 ms" in caplog.text


class _Sleeps:
    """Stands in for the ``time`` module of kafka.consumer.group: records sleeps, sleeps none."""

    def __init__(self, real):
        self.real, self.calls = real, []

    def sleep(self, seconds: float) -> None:
        self.calls.append(seconds)

    def __getattr__(self, name: str):
        return getattr(self.real, name)


def _racing_consumer(s):
    """A consumer of every partition of ``s``'s topic, positions resolved; and a function that
    makes the race happen on it: a fetch in flight, then a drain that looks just before the
    response is buffered (a wrapped fetched_records that waits for the response, then reports
    nothing), then the given fetch_records."""
    from kafka import TopicPartition

    from streaming.clients import make_consumer

    consumer = make_consumer(s.kafka, group_id=None)
    parts = [TopicPartition(s.kafka.topic, p) for p in range(s.kafka.partitions)]
    consumer.assign(parts)
    consumer.seek_to_beginning()
    for tp in parts:
        consumer.position(tp)  # offsets resolved: fetches can go out
    fetcher = consumer._fetcher

    def drain_before_the_landing(*args, **kwargs):
        del fetcher.fetched_records  # once: later drains are the real one
        deadline = time.monotonic() + 10
        while not fetcher._completed_fetches and time.monotonic() < deadline:
            time.sleep(0.005)
        assert fetcher._completed_fetches, "no fetch response arrived within 10 s"
        return {}, False

    def race(fetch_records):
        fetcher.send_fetches()
        fetcher.fetched_records = drain_before_the_landing
        return fetch_records(100, timeout_ms=500)

    return consumer, fetcher, race


@pytest.mark.kafka
def test_a_response_landing_between_drain_and_send_is_not_idle(kafka_settings, monkeypatch):
    """The race, made to happen on the real client and broker. kafka-python's own fetch_records
    then says idle with records buffered (its poll would sleep retry_backoff_ms); the consumer
    make_consumer builds says not idle, and its poll returns the records without sleeping."""
    import kafka.consumer.group as group_module

    produce(kafka_settings, [Record(f"u{i}".encode(), b'{"n": %d}' % i, BASE_MS + i) for i in range(40)])
    plain, fetcher, race = _racing_consumer(kafka_settings)
    try:
        own = getattr(fetcher.fetch_records, "__wrapped__", fetcher.fetch_records)
        assert race(own) == ({}, True), "kafka-python's own: idle, with a response buffered"
    finally:
        plain.close()
    mended, fetcher, race = _racing_consumer(kafka_settings)
    try:
        assert race(fetcher.fetch_records) == ({}, False), "make_consumer must install streaming.fetch_race"
        sleeps = _Sleeps(group_module.time)
        monkeypatch.setattr(group_module, "time", sleeps)
        got = mended.poll(timeout_ms=2000, max_records=100)
        monkeypatch.undo()
        assert sum(len(v) for v in got.values()) > 0 and sleeps.calls == []
    finally:
        mended.close()

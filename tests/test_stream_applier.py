"""The applier runs the batches handed to it in order, and refuses the ones queued behind a
batch that failed (the consumer queues the next batch while one is written; streaming.applier)."""

from __future__ import annotations

import threading

import pytest

from streaming.applier import InOrder, ThreadApplier


def test_in_order_refuses_everything_after_a_failure():
    order, ran = InOrder(), []
    assert order.run(lambda: ran.append(1) or "first") == "first"
    with pytest.raises(ConnectionError):
        order.run(lambda: (_ for _ in ()).throw(ConnectionError("redis went away")))
    with pytest.raises(RuntimeError, match="an earlier batch of hours failed .ConnectionError: redis went away"):
        order.run(lambda: ran.append(3))
    assert ran == [1]


def test_a_thread_applier_does_not_apply_the_batch_queued_behind_a_failed_one(settings, monkeypatch):
    import streaming.applier as applier

    release, applied = threading.Event(), []

    def fake_apply(state, version, hours, cfg, cache):
        release.wait(10)
        if hours == "bad":
            raise ValueError("the first batch broke")
        applied.append(hours)
        return []

    monkeypatch.setattr(applier, "apply_hours", fake_apply)
    version = type("V", (), {"version": "v1"})()
    kind = ThreadApplier(state=None, cfg=settings.incremental)
    try:
        first = kind.submit(version, "bad")
        second = kind.submit(version, "good")  # queued while the first is still running
        release.set()
        with pytest.raises(ValueError, match="broke"):
            first.result(10)
        with pytest.raises(RuntimeError, match="earlier batch of hours failed"):
            second.result(10)
        assert applied == []
    finally:
        kind.close()

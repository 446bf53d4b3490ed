"""The incremental consumer killed with SIGKILL at 20 seeded random points, then run to the end:
Redis equals an uninterrupted run over the same log (rows within 1e-6, histories, hour
counters, checkpoints and dead-letter counts equal), and every dead letter is in the
dead-letter topic.

The stream arrives in 20 slices, one before each killed run (the consumer runs in continuous
mode, as in production), so the kills fall in different hours of the log. Each kill is either a
named crash point (streaming.faults: half of an hour's rows written; all rows written, not yet
recorded; positions stored, offsets not yet committed) or a SIGKILL from outside at a random
time after the consumer got its partitions, which lands anywhere: reading, parsing, computing,
writing, producing dead letters, storing positions, committing offsets, idling.
"""

from __future__ import annotations

import json
import re
import signal
import time

import numpy as np
import pytest

from streaming.consumer import run_bounded
from streaming.state import StreamState
from tests.kafka_fixtures import BASE_MS, HOUR, make_stream, produce, publish_tiny, redis_snapshot, write_tiny_artifact
from tests.test_stream_consumer import assert_same_effect, cleanup, start_consumer, wait_for, with_prefix

pytestmark = [pytest.mark.faults, pytest.mark.kafka, pytest.mark.redis]

SEED = 20261125
KILLS = 20
N_HOURS = 60
POINTS = ("mid_rows:1", "after_rows:1", "after_checkpoint:1")


def kill_plan(seed: int, n: int) -> list[tuple[str, float | str]]:
    """``n`` kills: ("point", "<crash point>:1") or ("delay", seconds after the partitions were
    assigned). Pure and seeded, so the same points are tried every time."""
    rng = np.random.default_rng(seed)
    plan: list[tuple[str, float | str]] = []
    for _ in range(n):
        if rng.random() < 0.6:
            plan.append(("point", POINTS[int(rng.integers(len(POINTS)))]))
        else:
            plan.append(("delay", round(float(rng.uniform(0.0, 1.5)), 3)))
    return plan


def dead_letter_sources(s) -> list[tuple[int, int]]:
    """(source partition, source offset) of every record in the dead-letter topic."""
    from streaming.clients import make_consumer

    dlq = make_consumer(s.kafka, s.kafka.dead_letter_topic, group_id=None, consumer_timeout_ms=3000)
    try:
        return [(int(dict(r.headers)["source_partition"]), int(dict(r.headers)["source_offset"])) for r in dlq]
    finally:
        dlq.close()


def killed_run(s, log, kind: str, arg) -> int:
    """One continuous consumer run, killed as planned; returns its exit code."""
    mark = log.stat().st_size if log.exists() else 0
    if kind == "point":
        proc = start_consumer(s, log, mode="continuous", crash=str(arg))
        try:
            return proc.wait(120)
        finally:
            if proc.poll() is None:
                proc.kill()
    proc = start_consumer(s, log, mode="continuous")
    wait_for(lambda: "assigned partitions" in log.read_text()[mark:] or proc.poll() is not None, 120, "partition assignment")
    time.sleep(float(arg))
    proc.send_signal(signal.SIGKILL)
    return proc.wait(60)


def test_kill_9_at_20_random_points_leaves_redis_as_an_uninterrupted_run(kafka_settings, redis_client, tmp_path):
    from infra.kafka_topics import ensure_topics, project_topics
    from streaming.clients import make_admin

    s = kafka_settings.replace("incremental", min_events_new_user=2, idle_partition_s=0)
    ref = with_prefix(s, s.redis.prefix + "-ref", s.kafka.group_id + "-ref")
    ref = ref.replace("kafka", dead_letter_topic=s.kafka.dead_letter_topic + "-ref")  # its own, to compare
    admin = make_admin(ref.kafka)
    ensure_topics(admin, project_topics(ref.kafka))
    admin.close()
    tv = write_tiny_artifact(tmp_path / "artifacts", "v1", BASE_MS)
    publish_tiny(redis_client, s.redis.prefix, tv)
    publish_tiny(redis_client, ref.redis.prefix, tv)
    stream = make_stream(n_hours=N_HOURS, n_events=40 * N_HOURS, seed=11)
    slices = np.array_split(np.arange(len(stream)), KILLS)
    state = StreamState(redis_client, s.redis.prefix)
    log = tmp_path / "consumer.log"
    try:
        outcomes, progress = [], []
        for (kind, arg), part in zip(kill_plan(SEED, KILLS), slices):
            produce(s, [stream[i] for i in part])
            outcomes.append((kind, arg, killed_run(s, log, kind, arg)))
            progress.append(len(state.applied_windows("v1")))
        text = log.read_text()
        assert all(code == -signal.SIGKILL for _, _, code in outcomes), (outcomes, text[-3000:])
        final = start_consumer(s, log)  # bounded: to the end of the log, then exit
        assert final.wait(180) == 0, log.read_text()[-3000:]
        text = log.read_text()
        report = json.loads(text.strip().splitlines()[-1])
        assert report["status"] == "ok" and report["lag"] == 0

        reference = run_bounded(ref)
        assert reference["hours_applied"] == N_HOURS
        applied = re.findall(r"hour (\S+ \S+) UTC applied to version v1: (\d+) users updated \(\d+ new, (\d+) rows written now", text)
        assert len({h for h, _, _ in applied}) == N_HOURS
        assert any(int(w) < int(u) for _, u, w in applied), "no hour was re-applied after a kill"
        worst = assert_same_effect(redis_snapshot(redis_client, ref.redis.prefix, "v1"),
                                   redis_snapshot(redis_client, s.redis.prefix, "v1"))
        assert state.applied_windows("v1") == [BASE_MS + h * HOUR for h in range(N_HOURS)]
        # no dead letter lost; a kill between producing one and storing its mark may repeat it,
        # and its source headers identify the repeat
        got, expected = dead_letter_sources(s), dead_letter_sources(ref)
        assert set(got) == set(expected) and len(expected) == len(set(expected)) == reference["dead_letters"]
        print(f"kills: {outcomes}\nhours applied after each kill: {progress}\nmax row difference {worst}; "
              f"{len(got)} dead-letter records for {len(expected)} bad records")
    finally:
        cleanup(redis_client, ref.redis.prefix)

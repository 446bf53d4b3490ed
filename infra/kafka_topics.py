"""Create the project's Kafka topics idempotently (input topic and dead-letter topic).

Used by ``infra.local up`` and by the test broker fixture. Creating a topic that already exists
is not an error; a topic that exists with fewer partitions than configured is reported (Kafka
can grow partitions, but that re-keys users, so we never do it behind anyone's back).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from twotower.config import KafkaConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TopicState:
    """What ``ensure_topics`` found or did for one topic."""

    name: str
    partitions: int
    created: bool


def project_topics(cfg: KafkaConfig) -> list[tuple[str, int]]:
    """(name, partitions) of every topic the pipeline needs (pure)."""
    return [(cfg.topic, cfg.partitions), (cfg.dead_letter_topic, cfg.partitions)]


def existing_partitions(admin, names: list[str]) -> dict[str, int]:
    """Partition count of each of ``names`` that exists (missing topics are left out)."""
    found = {}
    for desc in admin.describe_topics(names):
        if desc.get("error_code", 0) == 0 and desc.get("partitions"):
            found[desc["name"]] = len(desc["partitions"])
    return found


def ensure_topics(admin, topics: list[tuple[str, int]], create: bool = True) -> list[TopicState]:
    """Make sure every (name, partitions) topic exists; create the missing ones when ``create``.

    Raises RuntimeError naming the topics when some are missing and ``create`` is False.
    """
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    names = [name for name, _ in topics]
    have = existing_partitions(admin, names)
    missing = [(name, n) for name, n in topics if name not in have]
    if missing and not create:
        raise RuntimeError(f"Kafka topics missing: {', '.join(n for n, _ in missing)} (create them with the cluster's tooling)")
    created = set()
    for name, n in missing:
        try:
            admin.create_topics([NewTopic(name=name, num_partitions=n, replication_factor=1)])
            created.add(name)
        except TopicAlreadyExistsError:
            pass  # another process created it between our check and the request
    if missing:
        have = existing_partitions(admin, names)
    states = []
    for name, n in topics:
        got = have.get(name, 0)
        if got == 0:
            raise RuntimeError(f"Kafka topic {name!r} still does not exist after creating it")
        if got < n:
            log.warning("topic %s has %d partitions, fewer than the configured %d; left as it is", name, got, n)
        states.append(TopicState(name=name, partitions=got, created=name in created))
    return states

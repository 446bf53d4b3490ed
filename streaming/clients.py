"""The one place Kafka clients are created (DESIGN §10: clients made in one place, injected).

Every producer, consumer and admin client of the project comes from here, so the security
settings of ``KafkaConfig`` (SSL, SASL) reach all of them the same way. Passwords are passed to
kafka-python and never logged; ``describe`` gives a loggable summary.

Producers and consumers wait for the broker at start (``wait_for_broker``): a job started
while Kafka is down or restarting logs what it waits for, retries with exponential backoff and
carries on once the broker answers, instead of crashing. Once running, kafka-python itself
reconnects; the consumer's positions live in Redis, so nothing read before an outage is lost.

Redis clients come from ``jobs.redis_conn.redis_client``.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any, Callable, TypeVar

from streaming.fetch_race import mend_idle_race
from twotower.config import KafkaConfig

log = logging.getLogger(__name__)

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
CONNECT_WAIT_S = 600.0
"""How long a producer or consumer waits at start for the broker before the job fails."""
BOOTSTRAP_TRY_MS = 10_000
"""How long one client construction waits for cluster metadata once the broker accepts connections."""
BACKOFF_FIRST_S, BACKOFF_CAP_S = 0.5, 15.0
"""Waits between attempts: 0.5, 1, 2, 4 ... seconds, at most 15."""
T = TypeVar("T")


def bootstrap_list(cfg: KafkaConfig) -> list[str]:
    """``host:port`` strings from the comma-separated bootstrap setting (pure)."""
    servers = [s.strip() for s in cfg.bootstrap_servers.split(",") if s.strip()]
    if not servers:
        raise ValueError("KafkaConfig.bootstrap_servers is empty (set KAFKA_BOOTSTRAP_SERVERS)")
    return servers


def common_options(cfg: KafkaConfig) -> dict[str, Any]:
    """Connection and security keyword arguments shared by every kafka-python client (pure)."""
    protocol = cfg.security_protocol.upper()
    if protocol not in SECURITY_PROTOCOLS:
        raise ValueError(f"unknown Kafka security_protocol {cfg.security_protocol!r}; expected one of {SECURITY_PROTOCOLS}")
    options: dict[str, Any] = {
        "bootstrap_servers": bootstrap_list(cfg),
        "security_protocol": protocol,
        "request_timeout_ms": cfg.request_timeout_ms,
    }
    if protocol.startswith("SASL"):
        if not cfg.sasl_mechanism:
            raise ValueError(f"security_protocol {protocol} needs KafkaConfig.sasl_mechanism (e.g. PLAIN, SCRAM-SHA-512)")
        options["sasl_mechanism"] = cfg.sasl_mechanism
        if cfg.sasl_username:
            options["sasl_plain_username"] = cfg.sasl_username
            options["sasl_plain_password"] = cfg.sasl_password
    if protocol in ("SSL", "SASL_SSL"):
        for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            if getattr(cfg, key):
                options[key] = getattr(cfg, key)
    return options


def describe(cfg: KafkaConfig) -> str:
    """Loggable one-line summary of where and how we connect (no secrets)."""
    auth = f", SASL {cfg.sasl_mechanism} as {cfg.sasl_username or '?'}" if cfg.security_protocol.upper().startswith("SASL") else ""
    return f"Kafka at {cfg.bootstrap_servers} ({cfg.security_protocol}{auth})"


def reachable(servers: list[str], timeout_s: float = 3.0) -> tuple[bool, str]:
    """(True, "") when one of the ``host:port`` servers accepts a TCP connection, else
    (False, why the last one did not)."""
    why = "no server configured"
    for server in servers:
        host, _, port = server.rpartition(":")
        try:
            with socket.create_connection((host.strip("[]"), int(port or 9092)), timeout=timeout_s):
                return True, ""
        except (OSError, ValueError) as exc:
            why = f"{server}: {type(exc).__name__}: {exc}"
    return False, why


def wait_for_broker(cfg: KafkaConfig, what: str, build: Callable[[], T], wait_s: float = CONNECT_WAIT_S) -> T:
    """``build()`` (a client constructor) once the broker answers, waiting up to ``wait_s``.

    Until a bootstrap server accepts connections, and while construction finds no broker,
    logs one warning per attempt (what is waited for, for how long so far) and sleeps with
    exponential backoff. Raises ConnectionError naming the broker after ``wait_s``.
    """
    from kafka.errors import KafkaConnectionError, KafkaTimeoutError

    t0 = time.monotonic()
    delay, attempt, announced = BACKOFF_FIRST_S, 0, False
    while True:
        attempt += 1
        up, why = reachable(bootstrap_list(cfg))
        if up:
            try:
                client = build()
                if announced:
                    log.info("%s: the Kafka broker answers again after %.0fs; carrying on", what, time.monotonic() - t0)
                return client
            except (KafkaTimeoutError, KafkaConnectionError) as exc:
                why = f"{type(exc).__name__}: {exc}"
        waited = time.monotonic() - t0
        if waited >= wait_s:
            raise ConnectionError(f"{what}: no Kafka broker answered at {describe(cfg)} within {wait_s:.0f}s ({why})")
        pause = min(delay, wait_s - waited)
        log.warning(
            "%s is waiting for the Kafka broker: %s does not answer (%s); attempt %d, waited %.0fs of at most %.0fs, "
            "next try in %.1fs", what, describe(cfg), why, attempt, waited, wait_s, pause,
        )  # fmt: skip
        announced = True
        time.sleep(pause)
        delay = min(delay * 2, BACKOFF_CAP_S)


class BrokerWatch:
    """Says in the log, in words, when the Kafka broker stops answering and when it is back.

    kafka-python reconnects on its own but reports an outage as dozens of low-level lines a
    second; a long-running client calls ``check()`` in its loop instead (a TCP probe of the
    bootstrap servers at most every ``every_s`` seconds, so it costs nothing).
    """

    def __init__(self, cfg: KafkaConfig, what: str, every_s: float = 5.0, remind_s: float = 60.0):
        self.cfg, self.what, self.every_s, self.remind_s = cfg, what, every_s, remind_s
        self.down_since: float | None = None
        self._last_check = self._last_report = float("-inf")

    def check(self, now: float | None = None) -> bool:
        """Probe (rate-limited) and log a change; returns whether the broker answered last."""
        now = time.monotonic() if now is None else now
        if now - self._last_check < self.every_s:
            return self.down_since is None
        self._last_check = now
        up, why = reachable(bootstrap_list(self.cfg), timeout_s=1.0)
        if up and self.down_since is not None:
            log.info("%s: the Kafka broker answers again after %.0fs; carrying on from where it was", self.what, now - self.down_since)
            self.down_since = None
        elif not up and self.down_since is None:
            self.down_since = self._last_report = now
            log.warning(
                "%s lost the Kafka broker: %s does not answer (%s); reconnecting with backoff. Nothing read so far "
                "is lost: positions are stored in Redis", self.what, describe(self.cfg), why,
            )  # fmt: skip
        elif not up and now - self._last_report >= self.remind_s:
            self._last_report = now
            log.warning("%s: still no Kafka broker at %s after %.0fs (%s)", self.what, describe(self.cfg), now - self.down_since, why)
        return self.down_since is None


def make_producer(cfg: KafkaConfig, wait_s: float = CONNECT_WAIT_S, **overrides: Any):
    """A KafkaProducer with bytes keys/values; acks=all and idempotent retries by default.
    Waits up to ``wait_s`` for the broker (``wait_for_broker``)."""
    from kafka import KafkaProducer

    options = {"acks": "all", "retries": 5, "linger_ms": 5, "bootstrap_timeout_ms": BOOTSTRAP_TRY_MS, **common_options(cfg), **overrides}
    return wait_for_broker(cfg, "Kafka producer", lambda: KafkaProducer(**options), wait_s)


def make_consumer(cfg: KafkaConfig, *topics: str, wait_s: float = CONNECT_WAIT_S, **overrides: Any):
    """A KafkaConsumer (no auto commit, earliest reset) optionally subscribed to ``topics``,
    with streaming.fetch_race's mend of kafka-python's 100 ms poll stall.

    Group timeouts follow ``cfg.session_timeout_ms`` (heartbeat at a third of it). Waits up to
    ``wait_s`` for the broker (``wait_for_broker``).
    """
    from kafka import KafkaConsumer

    options = {
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "session_timeout_ms": cfg.session_timeout_ms,
        "heartbeat_interval_ms": max(100, cfg.session_timeout_ms // 3),
        "bootstrap_timeout_ms": BOOTSTRAP_TRY_MS,
        "max_partition_fetch_bytes": cfg.max_partition_fetch_bytes,
        **common_options(cfg),
        **overrides,
    }
    # kafka-python insists that a request outlives a session.
    options["request_timeout_ms"] = max(options["request_timeout_ms"], options["session_timeout_ms"] + 5000)
    what = f"Kafka consumer (group {options.get('group_id')})" if options.get("group_id") else "Kafka consumer"
    consumer = wait_for_broker(cfg, what, lambda: KafkaConsumer(*topics, **options), wait_s)
    mend_idle_race(consumer)
    return consumer


def make_admin(cfg: KafkaConfig, **overrides: Any):
    """A KafkaAdminClient (topic creation, metadata)."""
    from kafka import KafkaAdminClient

    return KafkaAdminClient(**{**common_options(cfg), **overrides})

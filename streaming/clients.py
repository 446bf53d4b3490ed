"""The one place Kafka clients are created (DESIGN §10: clients made in one place, injected).

Every producer, consumer and admin client of the project comes from here, so the security
settings of ``KafkaConfig`` (SSL, SASL) reach all of them the same way. Passwords are passed to
kafka-python and never logged; ``describe`` gives a loggable summary.

Redis clients come from ``jobs.redis_conn.redis_client``.
"""

from __future__ import annotations

from typing import Any

from twotower.config import KafkaConfig

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")


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


def make_producer(cfg: KafkaConfig, **overrides: Any):
    """A KafkaProducer with bytes keys/values; acks=all and idempotent retries by default."""
    from kafka import KafkaProducer

    options = {"acks": "all", "retries": 5, "linger_ms": 5, **common_options(cfg), **overrides}
    return KafkaProducer(**options)


def make_consumer(cfg: KafkaConfig, *topics: str, **overrides: Any):
    """A KafkaConsumer (no auto commit, earliest reset) optionally subscribed to ``topics``.

    Group timeouts follow ``cfg.session_timeout_ms`` (heartbeat at a third of it).
    """
    from kafka import KafkaConsumer

    options = {
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "session_timeout_ms": cfg.session_timeout_ms,
        "heartbeat_interval_ms": max(100, cfg.session_timeout_ms // 3),
        **common_options(cfg),
        **overrides,
    }
    # kafka-python insists that a request outlives a session.
    options["request_timeout_ms"] = max(options["request_timeout_ms"], options["session_timeout_ms"] + 5000)
    return KafkaConsumer(*topics, **options)


def make_admin(cfg: KafkaConfig, **overrides: Any):
    """A KafkaAdminClient (topic creation, metadata)."""
    from kafka import KafkaAdminClient

    return KafkaAdminClient(**{**common_options(cfg), **overrides})

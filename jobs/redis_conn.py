"""The one place a Redis client is created (DESIGN §10: clients made in one place, injected).

Every job, the stream consumer and the serving layer call ``redis_client(settings)`` and pass
the client down; nothing else calls ``redis.Redis(...)``.

    redis://[[user]:password@]host:port/db     plain TCP
    rediss://[[user]:password@]host:port/db    TLS (optionally ``RedisConfig.ssl_ca_certs``)

A password in the URL wins; otherwise ``RedisConfig.password`` (TT_REDIS_PASSWORD) is used.
Connection errors and timeouts are retried ``RedisConfig.retries`` times with exponential
backoff and jitter, so a Redis failover or a restart during a publish is waited out instead of
failing the nightly run. Idle pooled connections are health-checked before reuse.
"""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from twotower.config import RedisConfig, Settings

log = logging.getLogger(__name__)

HEALTH_CHECK_INTERVAL_S = 30
"""A pooled connection idle longer than this is PINGed before it is reused."""


def redacted_url(url: str) -> str:
    """The URL with any password replaced by ``***`` (safe to log)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def client_options(cfg: RedisConfig) -> dict:
    """Keyword arguments for ``redis.Redis.from_url`` derived from the config (pure)."""
    parts = urlsplit(cfg.url)
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"Redis URL must start with redis:// or rediss://, got {redacted_url(cfg.url)!r}")
    options: dict = {
        "socket_timeout": cfg.socket_timeout_s,
        "socket_connect_timeout": cfg.socket_timeout_s,
        "health_check_interval": HEALTH_CHECK_INTERVAL_S,
        "retry": Retry(
            ExponentialWithJitterBackoff(base=0.1, cap=5.0),
            cfg.retries,
            supported_errors=(RedisConnectionError, RedisTimeoutError, TimeoutError, ConnectionResetError),
        ),
        "retry_on_error": [RedisConnectionError, RedisTimeoutError],
    }
    if parts.password is None and cfg.password:
        options["password"] = cfg.password
    if parts.scheme == "rediss" and cfg.ssl_ca_certs:
        options["ssl_ca_certs"] = cfg.ssl_ca_certs
    return options


def redis_client(settings: Settings, ping: bool = True) -> redis.Redis:
    """A pooled client for ``settings.redis.url`` (bytes responses).

    With ``ping`` the server is contacted once (with the retries above) so a wrong address
    fails here, with the address in the message, rather than deep inside a job.
    """
    cfg = settings.redis
    client = redis.Redis.from_url(cfg.url, **client_options(cfg))
    if ping:
        try:
            client.ping()
        except redis.RedisError as exc:
            client.close()
            raise ConnectionError(
                f"cannot reach Redis at {redacted_url(cfg.url)} after {cfg.retries} retries: {exc}"
            ) from exc
    return client

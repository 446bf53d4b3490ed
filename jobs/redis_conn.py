"""The one place a Redis client is created (DESIGN §10: clients made in one place, injected).

Every job, the stream consumer and the serving layer call ``redis_client(settings)`` and pass
the client down; nothing else calls ``redis.Redis(...)``.

    redis://[[user]:password@]host:port/db     plain TCP
    rediss://[[user]:password@]host:port/db    TLS (optionally ``RedisConfig.ssl_ca_certs``)

A password in the URL wins; otherwise ``RedisConfig.password`` (TT_REDIS_PASSWORD) is used.
Connection errors and timeouts are retried ``RedisConfig.retries`` times with exponential
backoff and jitter (retry n waits between half and all of min(8, 0.25 * 2**n) seconds: 7.75
to 15.5 s over the default 5 retries), so a Redis failover or a restart during a publish is
waited out instead of failing the nightly run. Idle pooled connections are health-checked before reuse.

A restarted Redis has forgotten every Lua script loaded into it (the script cache is not
persisted). redis-py loads a pipeline's scripts once, before its first attempt, so a pipeline
retried across a restart would fail with NoScriptError (and ours skip even that check once a
pool has loaded a script: it cost a round trip per pipeline). ``ResilientRedis`` pipelines load the
missing scripts again and re-run exactly the commands that failed that way (the others did
run, and are not repeated). Its scripts called on their own (``register_script``) do the same
until the server keeps them: redis-py reloads once, and a server that restarts again between
that reload and the call (seen in the fault suite: the consumer's checkpoint write died of it)
answers NoScriptError a second time. Re-running is safe: a call answered NoScriptError did not run.
"""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

import redis
from redis.backoff import EqualJitterBackoff
from redis.client import Pipeline
from redis.commands.core import Script
from redis.exceptions import AuthenticationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from twotower.config import RedisConfig, Settings

log = logging.getLogger(__name__)

HEALTH_CHECK_INTERVAL_S = 30
"""A pooled connection idle longer than this is PINGed before it is reused."""
BACKOFF_BASE_S = 0.25
"""Retry n waits between half and all of min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**n) seconds."""
BACKOFF_CAP_S = 8.0
SCRIPT_RELOADS = 5
"""Times a script call or a pipeline's script commands are re-run after NoScriptError."""


class ScriptReloadingPipeline(Pipeline):
    """A non-transactional pipeline that survives a Redis restart between loading its Lua
    scripts and running them: commands answered NoScriptError are re-run once, after the
    scripts are loaded again. Transactions (MULTI/EXEC) behave as redis-py's own."""

    def load_scripts(self) -> None:
        """redis-py asks the server (SCRIPT EXISTS) before EVERY pipeline that calls a script: a
        round trip per pipeline, which the hourly path runs several of per hour. Ask once per
        connection pool and script; a server that forgot them since answers NoScriptError,
        which ``execute`` handles."""
        known = self._known_scripts()
        if any(s.sha not in known for s in self.scripts):
            super().load_scripts()
            known.update(s.sha for s in self.scripts)

    def _known_scripts(self) -> set:
        return self.connection_pool.__dict__.setdefault("_tt_loaded_scripts", set())

    def execute(self, raise_on_error: bool = True) -> list:
        if self.transaction or self.explicit_transaction or not self.scripts:
            return super().execute(raise_on_error)
        stack, scripts = list(self.command_stack), set(self.scripts)
        results = super().execute(raise_on_error=False)  # resets the pipeline
        for _ in range(SCRIPT_RELOADS):
            missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
            if not missing:
                break
            log.warning(
                "Redis no longer knows %d of this pipeline's Lua script calls (it restarted and lost its "
                "script cache); loading the scripts again and re-running those commands", len(missing),
            )
            self._known_scripts().clear()
            self.command_stack, self.scripts = [stack[i] for i in missing], scripts
            for i, r in zip(missing, super().execute(raise_on_error=False)):
                results[i] = r
        if raise_on_error:
            self.raise_first_error(stack, results)
        return results


class LoggedRetry(Retry):
    """redis-py's Retry, saying in the log what failed and whether it retries (redis-py retries
    silently, so an on-call person would otherwise see only a slow job)."""

    def __init__(self, backoff, retries: int, supported_errors: tuple, where: str):
        super().__init__(backoff, retries, supported_errors)
        self.where = where

    def call_with_retry(self, do, fail, is_retryable=None, with_failure_count: bool = False):
        failures = 0

        def retryable(error: Exception) -> bool:
            # redis-py's AuthenticationError is a ConnectionError, but a wrong password stays wrong
            return not isinstance(error, AuthenticationError) and (is_retryable is None or is_retryable(error))

        def logged_fail(error: Exception, *count: int) -> None:
            nonlocal failures
            failures += 1
            if failures > self._retries:
                log.error("Redis at %s: still failing after %d retries (%s: %s); giving up", self.where, self._retries, type(error).__name__, error)
            else:
                log.warning(
                    "Redis at %s did not answer (%s: %s); retry %d of %d with exponential backoff",
                    self.where, type(error).__name__, error, failures, self._retries,
                )  # fmt: skip
            fail(error, *count)

        return super().call_with_retry(do, logged_fail, retryable, with_failure_count)


class ReloadingScript(Script):
    """redis-py's Script, reloaded for as long as the server forgets it (``SCRIPT_RELOADS``
    times), not once."""

    def __call__(self, keys=None, args=None, client=None):
        for attempt in range(SCRIPT_RELOADS + 1):
            try:
                return super().__call__(keys, args, client)  # evalsha; on NoScriptError: load, evalsha
            except NoScriptError:
                if attempt == SCRIPT_RELOADS:
                    raise
                log.warning("Redis forgot a Lua script again right after loading it (it restarted once more); loading it again")


class ResilientRedis(redis.Redis):
    """``redis.Redis`` whose pipelines and scripts reload Lua scripts a restarted server forgot."""

    def pipeline(self, transaction: bool = True, shard_hint=None) -> Pipeline:
        return ScriptReloadingPipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)

    def register_script(self, script) -> ReloadingScript:
        return ReloadingScript(self, script)


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
        "retry": LoggedRetry(
            EqualJitterBackoff(cap=BACKOFF_CAP_S, base=BACKOFF_BASE_S),
            cfg.retries,
            supported_errors=(RedisConnectionError, RedisTimeoutError, TimeoutError, ConnectionResetError),
            where=redacted_url(cfg.url),
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
    client = ResilientRedis.from_url(cfg.url, **client_options(cfg))
    if ping:
        try:
            client.ping()
        except AuthenticationError as exc:
            client.close()
            raise ConnectionError(
                f"Redis at {redacted_url(cfg.url)} refused the credentials ({exc}); check the password in "
                "REDIS_URL or TT_REDIS_PASSWORD"
            ) from exc
        except redis.RedisError as exc:
            client.close()
            raise ConnectionError(
                f"cannot reach Redis at {redacted_url(cfg.url)} after {cfg.retries} retries: {exc}"
            ) from exc
    return client

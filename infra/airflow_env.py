"""Local Airflow 3 for the project's DAGs: environment, metadata DB set-up, launcher, ``dags test``.

One rule ties Airflow to the pipeline's configuration: every Airflow process (scheduler, API
server, dag-processor, ``airflow dags test``) gets ``airflow_env(settings)``, which carries

  * the pipeline Settings, field by field, as ``TT_<SECTION>_<FIELD>`` variables, so that
    ``load_settings()`` inside a task rebuilds exactly the Settings of the caller (a test's
    private state dir and Redis prefix, a backfill's choices);
  * ``AIRFLOW_HOME`` = ``settings.airflow.home`` or ``<state_dir>/airflow`` (config with its
    generated secrets, the SQLite metadata DB, task logs; under state/, ignored by git);
  * the project's ``dags/`` folder, example DAGs off, the metadata DB URL (SQLite by default,
    the local PostgreSQL via ``TT_AIRFLOW_DB_URL``), the executor, and the UI bound to localhost;
  * ``PYTHONPATH`` with the project root, so tasks import ``jobs``, ``infra`` and friends, and
    the DAG folder (its helper ``_common``; Airflow's own DAG loading adds it as well).

``make airflow`` -> ``run_airflow(settings)``: migrate the DB, create the ``gpu`` pool, then run
``airflow standalone`` (API server + UI, scheduler, dag-processor, triggerer) in the foreground
until Ctrl-C. DAGs start paused; unpause them in the UI or with ``airflow dags unpause``.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping

from twotower.config import PROJECT_ROOT, Settings, _ALIASES, settings_env

log = logging.getLogger(__name__)

AIRFLOW = [sys.executable, "-m", "airflow"]
"""The Airflow CLI of this interpreter's environment (never another one on PATH)."""


def airflow_home(settings: Settings) -> Path:
    """AIRFLOW_HOME: ``settings.airflow.home`` or ``<state_dir>/airflow``."""
    home = settings.airflow.home
    return Path(home).expanduser().resolve() if home else settings.paths.state_dir / "airflow"


def airflow_env(settings: Settings, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for any Airflow subprocess of this project (see the module docstring).

    ``base`` defaults to the current environment; its ``AIRFLOW*`` and ``TT_*`` variables (and
    REDIS_URL & co.) are replaced, everything else (PATH, JAVA_HOME, ...) is kept.
    """
    cfg = settings.airflow
    home = airflow_home(settings)
    # Drop inherited Airflow and pipeline variables: the child must see exactly these Settings,
    # not a stale TT_* override from the shell for a field left at its default here.
    ours = set(_ALIASES.values())
    env = {k: v for k, v in (os.environ if base is None else base).items() if not k.startswith(("AIRFLOW", "TT_")) and k not in ours}
    env.update(settings_env(settings))
    # The project root for jobs/infra; the DAG folder for its helper module (Airflow adds it too).
    pythonpath = [str(PROJECT_ROOT), str(cfg.dags_folder)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    api = f"http://{cfg.api_host}:{cfg.api_port}"
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(cfg.dags_folder),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": cfg.executor,
            "AIRFLOW__CORE__PARALLELISM": str(cfg.parallelism),
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": cfg.db_url or f"sqlite:///{home / 'airflow.db'}",
            "AIRFLOW__API__HOST": cfg.api_host,
            "AIRFLOW__API__PORT": str(cfg.api_port),
            "AIRFLOW__API__BASE_URL": api,
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{api}/execution/",
            "PYTHONPATH": os.pathsep.join(dict.fromkeys(pythonpath)),
            # `airflow standalone` starts its components as `airflow ...` from PATH: this venv's.
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", os.defpath)]),
        }
    )
    return env


def _airflow(args: list[str], env: Mapping[str, str], timeout_s: float = 300) -> subprocess.CompletedProcess:
    """Run one Airflow CLI command; raises RuntimeError with its output tail when it fails."""
    proc = subprocess.run(AIRFLOW + args, env=dict(env), capture_output=True, text=True, timeout=timeout_s, cwd=PROJECT_ROOT)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-3000:]
        raise RuntimeError(f"airflow {' '.join(args)} failed with exit code {proc.returncode}:\n{tail}")
    return proc


def check_db_driver(settings: Settings) -> None:
    """Fail early, in words, when the configured metadata DB needs a driver that is not installed."""
    url = settings.airflow.db_url
    if url.startswith("postgresql"):
        driver = "psycopg" if url.startswith("postgresql+psycopg:") else "psycopg2"
        try:
            __import__(driver)
        except ImportError:
            raise RuntimeError(
                f"TT_AIRFLOW_DB_URL points at PostgreSQL ({url.split('@')[-1]}) but the {driver} driver is "
                "not installed in this environment; install apache-airflow[postgres] or unset TT_AIRFLOW_DB_URL "
                "to use SQLite"
            ) from None


def prepare_airflow(settings: Settings, env: Mapping[str, str] | None = None) -> Path:
    """Create AIRFLOW_HOME, migrate the metadata DB and create the gpu pool. Idempotent.

    Returns AIRFLOW_HOME. Takes ~8 s (two Airflow CLI start-ups).
    """
    check_db_driver(settings)
    env = airflow_env(settings) if env is None else env
    home = Path(env["AIRFLOW_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    _airflow(["db", "migrate"], env)
    cfg = settings.airflow
    _airflow(["pools", "set", cfg.gpu_pool, str(cfg.gpu_pool_slots), "index builds, one per GPU (twotower)"], env)
    log.info(
        "Airflow home %s ready (metadata DB %s, pool %r with %d slot(s)) in %.1f s",
        home, "SQLite" if not cfg.db_url else cfg.db_url.split("@")[-1], cfg.gpu_pool, cfg.gpu_pool_slots, time.time() - t0,
    )  # fmt: skip
    return home


def dags_test(
    settings: Settings,
    dag_id: str,
    logical_date: str,
    conf: Mapping[str, object] | None = None,
    *,
    log_path: Path,
    timeout_s: float | None = None,
    env: Mapping[str, str] | None = None,
) -> int:
    """``airflow dags test <dag_id> <logical_date> -c <conf>`` in a subprocess; returns its exit code.

    The run executes the DAG file's real tasks in one process (no scheduler needed) and is
    recorded in the metadata DB like any run. Output goes to ``log_path``. A run that exceeds
    ``timeout_s`` is stopped (its process group terminated) and reported as exit code 124.
    """
    import json

    env = airflow_env(settings) if env is None else env
    args = ["dags", "test", dag_id, logical_date]
    if conf:
        args += ["-c", json.dumps(dict(conf))]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as out:
        proc = subprocess.Popen(
            AIRFLOW + args, env=dict(env), stdout=out, stderr=subprocess.STDOUT, cwd=PROJECT_ROOT, start_new_session=True
        )
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            log.error("airflow dags test %s %s ran past %s s; stopping it", dag_id, logical_date, timeout_s)
            _stop_group(proc)
            return 124
        except BaseException:
            _stop_group(proc)
            raise


def _stop_group(proc: subprocess.Popen, grace_s: float = 20) -> None:
    """SIGTERM the process group of ``proc`` (Airflow and its children), SIGKILL after a grace period."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def run_airflow(settings: Settings) -> int:
    """``make airflow``: a local Airflow 3 with the project's DAGs, in the foreground until Ctrl-C.

    Returns the exit code of ``airflow standalone`` (0 after Ctrl-C).
    """
    cfg = settings.airflow
    if _port_in_use(cfg.api_host, cfg.api_port):
        log.error(
            "port %d on %s is already in use (another Airflow?); stop it or set TT_AIRFLOW_API_PORT", cfg.api_port, cfg.api_host
        )
        return 1
    env = airflow_env(settings)
    home = prepare_airflow(settings, env)
    log.info(
        "starting Airflow 3 (api-server, scheduler, dag-processor, triggerer; %s) with DAGs from %s; "
        "UI at http://%s:%d once ready; the admin password is printed below and kept in %s; "
        "DAGs start paused: unpause full_retrain / hourly_incremental in the UI; Ctrl-C stops everything",
        cfg.executor, cfg.dags_folder, cfg.api_host, cfg.api_port, home / "simple_auth_manager_passwords.json.generated",
    )  # fmt: skip
    proc = subprocess.Popen(AIRFLOW + ["standalone"], env=env, cwd=PROJECT_ROOT, start_new_session=True)
    signal.signal(signal.SIGTERM, _raise_interrupt)  # `kill` of this launcher stops Airflow too
    try:
        return proc.wait()
    except KeyboardInterrupt:
        log.info("stopping Airflow")
        _stop_group(proc, grace_s=30)
        return 0

"""Fixtures of the Airflow tests (tests/test_dags.py, tests/test_backfill.py).

One Airflow home (metadata DB migrated, ``gpu`` pool created) per test session; each test runs
DAGs with its own state dir and Redis prefix, passed to Airflow through ``airflow_env``. DAG runs
are real ``airflow dags test`` subprocesses, the same path ``make backfill`` takes.
"""

from __future__ import annotations

import json
import shutil
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from infra.airflow_env import dags_test, prepare_airflow
from twotower.config import PROJECT_ROOT, Settings, load_settings

DAGS_DIR = PROJECT_ROOT / "dags"
DAG_RUN_TIMEOUT_S = 1200


def import_dag_helpers():
    """dags/_common as a module (Airflow puts the DAG folder on sys.path; tests do it here)."""
    if str(DAGS_DIR) not in sys.path:
        sys.path.insert(0, str(DAGS_DIR))
    import _common

    return _common


@pytest.fixture(scope="session")
def airflow_home(tmp_path_factory) -> Path:
    """A migrated Airflow home shared by the session's DAG runs (each run has its own run id)."""
    home = tmp_path_factory.mktemp("airflow_home")
    prepare_airflow(load_settings().replace("airflow", home=str(home)))
    return home


@pytest.fixture
def dag_settings(settings: Settings, airflow_home: Path) -> Settings:
    """``settings`` (private state dir and Redis prefix) sized for DAG runs in tests: one epoch,
    no retries, a short raw-data wait, a small local Spark."""
    return (
        settings.replace("airflow", home=str(airflow_home), retries=0, raw_poke_interval_s=2, raw_wait_timeout_s=20)
        .replace("train", epochs=1)
        .replace("spark", master="local[2]", shuffle_partitions=4, driver_memory="2g")
    )


def copy_raw(raw_src: Path, settings: Settings) -> None:
    """Put a raw event tree (session fixture, read-only) under the test's state dir."""
    shutil.copytree(raw_src, settings.paths.raw_dir)


@dataclass
class DagRun:
    """What one ``airflow dags test`` run left behind."""

    exit_code: int
    outcome: dict[str, Any] | None
    log: str

    def explain(self) -> str:
        """The tail of the Airflow output, for assertion messages."""
        return f"exit code {self.exit_code}, outcome {self.outcome}\n--- airflow output (tail) ---\n{self.log[-6000:]}"


def run_dag(settings: Settings, dag_id: str, logical_date: str, conf: dict[str, Any] | None = None) -> DagRun:
    """Run ``dag_id`` for ``logical_date`` through ``airflow dags test`` and read its outcome file."""
    tag = uuid.uuid4().hex[:8]
    out_dir = settings.paths.state_dir / "dag_runs"
    outcome_file = out_dir / f"{dag_id}-{logical_date}-{tag}.json"
    log_path = out_dir / f"{dag_id}-{logical_date}-{tag}.log"
    rc = dags_test(
        settings,
        dag_id,
        logical_date,
        {**(conf or {}), "outcome_file": str(outcome_file)},
        log_path=log_path,
        timeout_s=DAG_RUN_TIMEOUT_S,
    )
    outcome = json.loads(outcome_file.read_text()) if outcome_file.exists() else None
    return DagRun(rc, outcome, log_path.read_text(errors="replace"))

"""make backfill: days reprocessed through the nightly DAG, idempotently, never rolling the serving
pointer back to an older data cutoff unless forced, and saying per day what it did."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from infra.airflow_env import airflow_env
from jobs.backfill import _day_result, backfill, backfill_days, backfill_settings, describe
from tests.airflow_fixtures import airflow_home, copy_raw, dag_settings  # noqa: F401  (fixtures)
from twotower import redis_keys as rk
from twotower.contracts import ARTIFACT_FILES, prepared_partition

D1, D2 = dt.date(1998, 4, 21), dt.date(1998, 4, 22)


def test_backfill_days_are_inclusive_and_oldest_first():
    assert backfill_days(D1, D1) == [D1]
    assert backfill_days(dt.date(1998, 2, 27), dt.date(1998, 3, 2)) == [
        dt.date(1998, 2, 27), dt.date(1998, 2, 28), dt.date(1998, 3, 1), dt.date(1998, 3, 2),
    ]  # fmt: skip
    with pytest.raises(ValueError, match="before its start"):
        backfill_days(D2, D1)


def test_backfill_runs_in_its_own_airflow_db_beside_the_schedulers(settings):
    # A scheduler sharing the DB would queue the tasks of a `dags test` run a second time.
    env = airflow_env(backfill_settings(settings))
    assert env["AIRFLOW_HOME"] == str(settings.paths.state_dir / "airflow-backfill")
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] != airflow_env(settings)["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]


def test_backfill_refuses_an_unknown_publish_mode(settings):
    with pytest.raises(ValueError, match="publish must be one of auto, force, no"):
        backfill(settings, D1, D1, "yes")


def test_day_result_reads_the_outcome_and_says_what_happened(tmp_path):
    log = tmp_path / "x.log"
    outcome = {
        "status": "not_published",
        "reason": "serving 19980422-aa has a newer data cutoff",
        "artifact_dir": "/s/artifacts/19980421-bb",
        "publish": {"switched": False},
        "run_id": "manual__x",
    }
    r = _day_result(D1, "auto", 0, outcome, 12.34, log)
    assert (r["version"], r["switched"], r["status"], r["seconds"]) == ("19980421-bb", False, "not_published", 12.3)
    assert describe(r) == (
        "1998-04-21: 19980421-bb rebuilt; serving pointer NOT moved: serving 19980422-aa has a newer data cutoff "
        "(PUBLISH=force would move it)"
    )
    lost = _day_result(D1, "force", 1, None, 3.0, log)
    assert lost["status"] == "failed" and f"see {log}" in lost["reason"] and lost["version"] == ""
    assert describe(lost).startswith("1998-04-21: FAILED, serving pointer untouched: airflow dags test exited with code 1")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _prepared_content(part: Path) -> dict:
    """The prepared partition's data, independent of Spark's part-file names."""
    out = {"manifest": json.loads((part / "manifest.json").read_text())}
    for name in ("train", "eval"):
        out[name] = pq.read_table(part / name).sort_by([("user_idx", "ascending"), ("ts", "ascending"), ("item_idx", "ascending")]).to_pylist()
    for name in ("vocab_users", "vocab_items", "item_freq"):
        out[name] = pq.read_table(part / f"{name}.parquet").to_pylist()
    return out


def _pointer(client, prefix: str) -> str | None:
    current = client.hget(rk.pointer(prefix), "current")
    return current.decode() if current else None


@pytest.mark.slow
@pytest.mark.airflow
@pytest.mark.spark
@pytest.mark.redis
def test_backfill_is_idempotent_and_moves_the_pointer_back_only_when_forced(dag_settings, ml_small_raw_dir, redis_client):
    """Users 1..120 of MovieLens-100K. Publish D2, then backfill the older D1 twice: with auto it
    is rebuilt but the pointer stays on D2 (and the run says so); with force the pointer moves to
    D1. Both D1 runs leave identical prepared data and model files (same version)."""
    s = dag_settings.replace("gate", max_regression=1.0)  # the gate is not under test here
    copy_raw(ml_small_raw_dir, s)
    prefix = s.redis.prefix

    [newer] = backfill(s, D2, D2, "auto")
    assert newer["status"] == "published" and newer["switched"], newer
    assert _pointer(redis_client, prefix) == newer["version"] and newer["version"].startswith("19980422-")

    [older] = backfill(s, D1, D1, "auto")
    assert older["status"] == "not_published" and not older["switched"], older
    assert "not switching back" in older["reason"] and older["version"].startswith("19980421-")
    assert _pointer(redis_client, prefix) == newer["version"]  # serving stays on the newer cutoff
    part = prepared_partition(s.paths.prepared_dir, D1)
    artifact = Path(older["artifact_dir"])
    first = {
        "prepared": _prepared_content(part),
        "files": {f: _digest(artifact / ARTIFACT_FILES[f]) for f in ("model", "item_embeddings", "index", "vocab_users", "users")},
    }

    [forced] = backfill(s, D1, D1, "force")
    assert forced["status"] == "published" and forced["switched"], forced
    assert forced["version"] == older["version"]
    assert _pointer(redis_client, prefix) == older["version"]
    assert redis_client.hget(rk.pointer(prefix), "previous").decode() == newer["version"]
    again = {
        "prepared": _prepared_content(part),
        "files": {f: _digest(artifact / ARTIFACT_FILES[f]) for f in first["files"]},
    }
    assert again == first  # the re-run rebuilt the same partition and the same model, bit for bit

    from jobs.runs import recent_runs

    days = [(r["logical_date"], r["status"]) for r in recent_runs(s, "full_retrain", client=redis_client)]
    assert days[:3] == [("1998-04-21", "published"), ("1998-04-21", "not_published"), ("1998-04-22", "published")]
    summaries = recent_runs(s, "backfill", client=redis_client)
    assert [(r["logical_date"], r["status"], r["details"]["publish"]) for r in summaries] == [
        ("1998-04-21", "ok", "force"), ("1998-04-21", "ok", "auto"), ("1998-04-22", "ok", "auto"),
    ]  # fmt: skip

"""The Airflow DAGs: they parse (without importing the heavy stack), are wired as designed, and
run end to end through ``airflow dags test`` on MovieLens-100K-derived data and a real Kafka
protocol broker; plus the pure rules in dags/_common.py that decide a run's outcome."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from infra.airflow_env import airflow_env, settings_env
from streaming.events import Event, parse_event
from tests.airflow_fixtures import airflow_home, copy_raw, dag_settings, import_dag_helpers, run_dag  # noqa: F401
from tests.kafka_fixtures import kafka_broker, kafka_settings  # noqa: F401  (fixtures)
from twotower import redis_keys as rk
from twotower.config import Settings, load_settings
from twotower.contracts import ARTIFACT_FILES, is_complete, prepared_partition

common = import_dag_helpers()

# --- parsing and wiring ---------------------------------------------------------------------

INSPECT_DAGS = r"""
import json, sys
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
heavy = sorted(m for m in ("torch", "pyspark", "faiss", "redis", "kafka", "pyarrow", "jobs.nightly") if m in sys.modules)
dags = {}
for dag_id in bag.dag_ids:
    dag = bag.dags[dag_id]
    dags[dag_id] = {
        "schedule": f"{type(dag.timetable).__name__} {dag.timetable.expression} {dag.timetable.timezone}",
        "catchup": dag.catchup,
        "max_active_runs": dag.max_active_runs,
        "params": {k: dag.params[k] for k in dag.params},
        "tasks": {
            t.task_id: {
                "downstream": sorted(t.downstream_task_ids),
                "trigger_rule": getattr(t.trigger_rule, "value", t.trigger_rule),
                "upstream": sorted(t.upstream_task_ids),
                "teardown": t.is_teardown,
                "pool": t.pool,
                "retries": t.retries,
                "timeout_s": t.execution_timeout.total_seconds() if t.execution_timeout else None,
                "mode": getattr(t, "mode", None),
                "sensor_timeout_s": getattr(t, "timeout", None),
            }
            for t in dag.tasks
        },
    }
print(json.dumps({"errors": {k: str(v) for k, v in bag.import_errors.items()}, "heavy": heavy, "dags": dags}))
"""


@pytest.fixture(scope="module")
def parsed(tmp_path_factory) -> dict:
    """The DAG folder as a fresh Airflow process sees it (a subprocess, so sys.modules is clean)."""
    # Defaults, whatever TT_* variables the shell has: the assertions below name default values.
    s = Settings().replace("paths", state_dir=tmp_path_factory.mktemp("parse") / "state").replace("airflow", retries=3)
    proc = subprocess.run(
        [sys.executable, "-c", INSPECT_DAGS, str(s.airflow.dags_folder)], env=airflow_env(s), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_dag_files_import_without_errors_and_without_the_heavy_stack(parsed):
    assert parsed["errors"] == {}
    assert sorted(parsed["dags"]) == ["full_retrain", "hourly_incremental"]
    # Parsing happens every few seconds in the dag-processor: no torch/Spark/faiss/clients there.
    assert parsed["heavy"] == []


def test_full_retrain_is_wired_as_designed(parsed):
    dag = parsed["dags"]["full_retrain"]
    tasks = dag["tasks"]
    chain = ["wait_for_raw", "prepare", "train", "evaluate", "gate", "build_index", "validate_index", "publish"]
    assert sorted(tasks) == sorted(chain + ["record_run"])
    for up, down in zip(chain, chain[1:]):
        assert down in tasks[up]["downstream"], f"{up} -> {down} missing"
    # Nothing skips a stage: the only edges besides the chain carry the artifact dir from train.
    for task_id, t in tasks.items():
        extra = set(t["downstream"]) - {"record_run"} - set(chain[chain.index(task_id) + 1 :] if task_id in chain else [])
        assert not extra, f"{task_id} -> {extra} runs a stage out of order"
        if task_id != "record_run":
            assert "record_run" in t["downstream"]
    # A teardown with no setup task runs once all upstream tasks are done, whatever their states,
    # and does not decide the run's state (a failed stage keeps the run failed).
    assert tasks["record_run"]["teardown"] and tasks["record_run"]["trigger_rule"] == "all_done_setup_success"
    assert tasks["record_run"]["upstream"] == sorted(chain) and tasks["record_run"]["downstream"] == []
    assert tasks["build_index"]["pool"] == "gpu"
    assert tasks["wait_for_raw"]["mode"] == "reschedule" and tasks["wait_for_raw"]["sensor_timeout_s"] == 6 * 3600
    assert tasks["prepare"]["retries"] == 3 and tasks["train"]["timeout_s"] == 4 * 3600
    # Verdicts fail without retrying (AirflowFailException); infrastructure errors are retried.
    assert tasks["gate"]["retries"] == 3 and tasks["wait_for_raw"]["retries"] == 3
    assert dag["catchup"] is False and dag["max_active_runs"] == 1
    assert dag["schedule"] == "CronDataIntervalTimetable 0 0 * * * UTC"
    assert dag["params"] == {"publish": "auto", "outcome_file": ""}


def test_hourly_incremental_is_wired_as_designed(parsed):
    dag = parsed["dags"]["hourly_incremental"]
    tasks = dag["tasks"]
    assert tasks["consume"]["downstream"] == ["check_lag", "record_run"]
    assert tasks["check_lag"]["downstream"] == ["record_run"]
    assert tasks["archive"]["upstream"] == [] and tasks["archive"]["downstream"] == ["record_run"]  # beside the consumer
    assert tasks["record_run"]["teardown"] and tasks["record_run"]["trigger_rule"] == "all_done_setup_success"
    assert tasks["record_run"]["upstream"] == ["archive", "check_lag", "consume"]
    assert tasks["consume"]["timeout_s"] == 50 * 60 and tasks["consume"]["retries"] == 3
    assert tasks["archive"]["timeout_s"] == 50 * 60 and tasks["archive"]["retries"] == 3
    assert dag["schedule"] == "CronDataIntervalTimetable 0 * * * * UTC" and dag["catchup"] is False and dag["max_active_runs"] == 1


def test_settings_reach_airflow_tasks_unchanged(settings):
    s = settings.replace("train", epochs=3, logq=False).replace("gate", max_regression=0.125).replace("airflow", lag_threshold=7)
    stale = {"REDIS_URL": "redis://elsewhere:1/0", "TT_AIRFLOW_HOME": "/elsewhere", "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor"}
    env = airflow_env(s, base={**stale, "JAVA_HOME": "/opt/java"})
    assert load_settings(env) == s  # stale variables from the shell do not win
    assert env["JAVA_HOME"] == "/opt/java" and "TT_AIRFLOW_HOME" not in env
    assert env["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"
    assert env["AIRFLOW_HOME"] == str(s.paths.state_dir / "airflow")
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] == f"sqlite:///{s.paths.state_dir / 'airflow' / 'airflow.db'}"
    assert env["AIRFLOW__CORE__LOAD_EXAMPLES"] == "False" and env["AIRFLOW__API__HOST"] == "127.0.0.1"
    assert settings_env(s)["TT_TRAIN_LOGQ"] == "false"


# --- the pure rules in dags/_common.py -------------------------------------------------------


def test_logical_day_and_interval_come_from_the_logical_date_only():
    ctx = {"logical_date": dt.datetime(1998, 4, 22, tzinfo=dt.timezone.utc)}
    assert common.logical_day(ctx) == dt.date(1998, 4, 22)
    assert common.logical_interval(ctx, dt.timedelta(days=1)) == ("1998-04-22T00:00:00+00:00", "1998-04-23T00:00:00+00:00")
    late = {"logical_date": dt.datetime(1998, 4, 22, 23, 30, tzinfo=dt.timezone(dt.timedelta(hours=-5)))}
    assert common.logical_day(late) == dt.date(1998, 4, 23)  # the UTC day
    with pytest.raises(ValueError, match="no logical date"):
        common.logical_day({"logical_date": None})


def test_raw_day_ready_needs_the_day_or_a_later_one(tmp_path):
    raw = tmp_path / "raw"
    day = dt.date(1998, 4, 21)
    assert common.raw_day_ready(raw, day) == (False, f"waiting for raw partition {raw / 'dt=1998-04-21'}")
    (raw / "dt=1998-04-20").mkdir(parents=True)
    (raw / "dt=1998-04-20" / "part-0.parquet").write_bytes(b"x")
    (raw / ".dt=1998-04-22.abc.tmp").mkdir()  # an ingest in progress never counts
    (raw / ".dt=1998-04-22.abc.tmp" / "part-0.parquet").write_bytes(b"x")
    (raw / "dt=1998-04-23").mkdir()  # an empty directory is not data
    assert common.raw_day_ready(raw, day)[0] is False
    (raw / "dt=1998-04-23" / "part-0.parquet").write_bytes(b"x")
    ready, why = common.raw_day_ready(raw, day)
    assert ready and "dt=1998-04-23 exists" in why and "closed and empty" in why
    (raw / "dt=1998-04-21").mkdir()
    (raw / "dt=1998-04-21" / "part-0.parquet").write_bytes(b"x")
    assert common.raw_day_ready(raw, day) == (True, f"raw partition {raw / 'dt=1998-04-21'} is there (1 file(s))")


def test_index_recall_check_uses_the_measured_recall():
    meta = {"factory": "IVF64,PQ16", "nprobe": 8, "ann_recall_at_100": 0.9312, "fallback": None}
    assert common.check_index_recall(meta, 0.93)[0] is True
    ok, why = common.check_index_recall(meta, 0.95)
    assert not ok and "0.9312" in why and "0.9500" in why
    assert common.check_index_recall({"type": "flat"}, 0.9)[0] is False


def test_lag_check():
    assert common.check_lag({"status": "ok", "lag": 100}, 100) == (True, "consumer lag 100 records (threshold 100)")
    ok, why = common.check_lag({"status": "ok", "lag": 101}, 100)
    assert not ok and "101 records" in why and "falling behind" in why
    assert common.check_lag({"status": "time_limit", "lag": 5000}, 100)[0] is False
    assert common.check_lag({"status": "ok", "lag": None}, 100)[0] is False
    assert common.check_lag({"status": "no_partitions", "lag": None}, 100)[0] is False
    assert common.check_lag({"status": "no_version", "lag": None}, 100)[0] is True


ALL_OK = {t: "success" for t in common.NIGHTLY_TASKS}


@pytest.mark.parametrize(
    "states, errors, gate, publish, expected",
    [
        (ALL_OK, {}, {"passed": True}, {"switched": True, "version": "v2"}, ("published", "serving pointer switched to v2")),
        (ALL_OK, {}, {"passed": True}, {"switched": False, "reason": "older cutoff"}, ("not_published", "older cutoff")),
        ({**ALL_OK, "publish": "skipped"}, {}, {"passed": False, "reason": "r"}, None, ("built", None)),
        (
            {**ALL_OK, "gate": "failed", "build_index": "upstream_failed", "validate_index": "upstream_failed", "publish": "upstream_failed"},
            {"gate": "AirflowFailException: ..."},
            {"passed": False, "reason": "hit@50 fell by 12%"},
            None,
            ("gated", "quality gate stopped the publish: hit@50 fell by 12%"),
        ),
        (  # the gate task crashed before deciding: a failure, not a verdict
            {**ALL_OK, "gate": "failed", "publish": "upstream_failed"}, {"gate": "ConnectionError: redis"}, None, None,
            ("failed", "gate failed: ConnectionError: redis"),
        ),
        (
            {**ALL_OK, "train": "failed", "evaluate": "upstream_failed", "publish": "upstream_failed"},
            {"train": "RuntimeError: NaN loss"}, None, None, ("failed", "train failed: RuntimeError: NaN loss"),
        ),
        ({**ALL_OK, "wait_for_raw": "failed", "prepare": "upstream_failed"}, {}, None, None, ("failed", "wait_for_raw failed: see the task log")),
    ],
)
def test_nightly_outcome(states, errors, gate, publish, expected):
    status, reason = common.nightly_outcome(states, errors, gate, publish)
    assert status == expected[0]
    if expected[1] is not None:
        assert reason == expected[1]


def test_hourly_outcome():
    ok = {"consume": "success", "check_lag": "success", "archive": "success"}
    report = {"status": "ok", "hours_applied": 3, "users_updated": 40, "lag": 0}
    landed = {"status": "ok", "events_written": 12, "duplicates_skipped": 2}
    assert common.hourly_outcome(ok, {}, report, landed) == (
        "ok", "3 closed hour(s) applied to 40 user row(s); lag 0 records; 12 new event(s) landed as raw Parquet (2 already there)",
    )  # fmt: skip
    assert common.hourly_outcome(ok, {}, {"status": "no_version"}, landed)[0] == "no_version"
    lagging = {**ok, "check_lag": "failed"}
    assert common.hourly_outcome(lagging, {"check_lag": "lag is 9 records"}, report, landed) == ("lagging", "lag is 9 records")
    assert common.hourly_outcome({"consume": "failed", "check_lag": "upstream_failed", "archive": "success"}, {"consume": "KafkaError: x"}, None, landed) == (
        "failed", "consume failed: KafkaError: x",
    )  # fmt: skip
    # rows fresh, but the nightly would miss the stream's latest events: the run fails, naming the archive
    status, reason = common.hourly_outcome({**ok, "archive": "failed"}, {"archive": "OSError: disk full"}, report, None)
    assert status == "failed" and reason.startswith("archive failed") and reason.endswith("OSError: disk full")
    assert common.hourly_outcome({**ok, "archive": "running"}, {}, report, None)[0] == "failed"  # unfinished


def test_run_start_is_the_later_of_start_date_and_run_after():
    class Run:
        start_date = dt.datetime(1998, 4, 22, tzinfo=dt.timezone.utc)  # what `dags test` sets
        run_after = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)

    assert common.run_started_at(Run()) == Run.run_after.timestamp()


# --- end to end through `airflow dags test` ----------------------------------------------------

DAY = "1998-04-22"  # last day of MovieLens-100K


@pytest.mark.slow
@pytest.mark.airflow
@pytest.mark.spark
@pytest.mark.redis
def test_nightly_dag_gated_run_stops_before_index_and_publish_and_says_why(dag_settings, ml_small_raw_dir, redis_client):
    """The whole nightly DAG on users 1..120 of MovieLens-100K with an unreachable quality floor:
    prepare, train and evaluate complete, the gate fails the run with its reason, nothing is
    indexed or published, and the run is recorded as gated."""
    s = dag_settings.replace("gate", min_value=1.01)
    copy_raw(ml_small_raw_dir, s)
    run = run_dag(s, "full_retrain", DAY, {"publish": "auto"})
    assert run.outcome is not None, run.explain()
    out = run.outcome
    assert run.exit_code != 0, run.explain()  # the DAG run is failed: on-call sees red
    assert out["status"] == "gated", run.explain()
    assert out["reason"].startswith("quality gate stopped the publish: hit@50 ") and "below the absolute floor 1.0100" in out["reason"]
    assert out["task_states"] == {
        "wait_for_raw": "success", "prepare": "success", "train": "success", "evaluate": "success",
        "gate": "failed", "build_index": "upstream_failed", "validate_index": "upstream_failed", "publish": "upstream_failed",
    }  # fmt: skip
    assert out["logical_date"] == DAY
    assert (out["data_interval_start"], out["data_interval_end"]) == ("1998-04-22T00:00:00+00:00", "1998-04-23T00:00:00+00:00")
    assert out["conf"]["publish"] == "auto" and out["gate"]["passed"] is False
    assert 0 < out["duration_s"] < 1200 and out["finished_at"] - out["started_at"] == pytest.approx(out["duration_s"], abs=0.01)

    # The stages that ran left whole outputs for the logical date, named by it.
    assert is_complete(prepared_partition(s.paths.prepared_dir, dt.date(1998, 4, 22)))
    artifact = Path(out["artifact_dir"])
    assert artifact.parent == s.paths.artifacts_dir and artifact.name.startswith("19980422-") and out["version"] == artifact.name
    metrics = json.loads((artifact / ARTIFACT_FILES["metrics"]).read_text())
    assert out["metrics"]["exact"] == metrics["exact"] and 0.0 <= metrics["exact"]["hit@50"] < 1.01
    assert not (artifact / ARTIFACT_FILES["index_meta"]).exists()  # never indexed

    # Nothing was published, and the run history the status command reads has the run.
    assert redis_client.hgetall(rk.pointer(s.redis.prefix)) == {}
    from jobs.runs import latest_run

    rec = latest_run(s, "full_retrain", client=redis_client)
    assert rec["status"] == "gated" and rec["logical_date"] == DAY
    assert rec["details"]["version"] == artifact.name and rec["details"]["run_id"] == out["run_id"]
    assert rec["duration_s"] == pytest.approx(out["duration_s"], abs=0.01)


@pytest.fixture
def kafka_dag_settings(kafka_settings, airflow_home):  # noqa: F811
    """kafka_settings (private topics and group on the session broker) for DAG runs."""
    return kafka_settings.replace("airflow", home=str(airflow_home), retries=0)



@pytest.mark.slow
@pytest.mark.airflow
@pytest.mark.kafka
@pytest.mark.redis
def test_hourly_dag_applies_closed_hours_then_fails_loudly_when_lag_is_over_threshold(kafka_dag_settings, redis_client, tmp_path):
    """hourly_incremental against a real Kafka-protocol broker: the first run applies every closed
    hour, passes the lag check and lands every valid event as raw Parquet; a second run with a threshold below zero changes nothing in
    Redis (exactly-once) and fails check_lag with the numbers, recorded as lagging."""
    from tests.kafka_fixtures import BASE_MS, make_stream, produce, publish_tiny, redis_snapshot, write_tiny_artifact

    s = kafka_dag_settings
    tiny = write_tiny_artifact(tmp_path / "artifacts", "v-hourly", BASE_MS)
    publish_tiny(redis_client, s.redis.prefix, tiny)
    records = make_stream(partitions=s.kafka.partitions)
    produce(s, records)
    before = redis_snapshot(redis_client, s.redis.prefix, tiny.version)

    first = run_dag(s, "hourly_incremental", "2024-03-01T10:00:00+00:00")
    assert first.exit_code == 0 and first.outcome is not None, first.explain()
    report = first.outcome["consumer"]
    assert first.outcome["status"] == "ok" and report["version"] == tiny.version
    # the archive task landed every valid event once, by event time, for the nightly run
    valid = {e.event_id for r in records if isinstance(e := parse_event(r.value, r.key, r.ts), Event)}
    landed = first.outcome["archive"]
    assert landed["status"] == "ok" and landed["events_written"] == len(valid) and landed["invalid"] > 0, landed
    assert sorted(pq.read_table(s.paths.raw_dir)["event_id"].to_pylist()) == sorted(valid)
    assert report["hours_applied"] >= 8 and report["users_updated"] > 0 and report["lag"] == 0, report
    after = redis_snapshot(redis_client, s.redis.prefix, tiny.version)
    moved = [k for k, row in after["rows"].items() if row[1] > before["rows"].get(k, (None, -1))[1]]
    assert moved and all(after["rows"][k][1] >= BASE_MS - 3_600_000 for k in moved)  # w = an applied hour's start
    assert first.outcome["data_interval_start"] == "2024-03-01T10:00:00+00:00"
    assert first.outcome["data_interval_end"] == "2024-03-01T11:00:00+00:00"

    second = run_dag(s.replace("airflow", lag_threshold=-1), "hourly_incremental", "2024-03-01T11:00:00+00:00")
    assert second.exit_code != 0 and second.outcome is not None, second.explain()
    assert second.outcome["status"] == "lagging"
    assert "consumer lag is 0 records after the hourly run, above the threshold of -1" in second.outcome["reason"]
    assert second.outcome["task_states"] == {"consume": "success", "check_lag": "failed", "archive": "success"}
    assert second.outcome["consumer"]["hours_applied"] == 0
    assert second.outcome["archive"]["records_read"] == second.outcome["archive"]["events_written"] == 0  # offsets committed
    again = redis_snapshot(redis_client, s.redis.prefix, tiny.version)  # a re-run applies nothing twice
    assert again["hists"] == after["hists"] and again["rows"].keys() == after["rows"].keys()
    for key, (row, w, n) in after["rows"].items():
        assert (again["rows"][key][1:], again["rows"][key][0].tobytes()) == ((w, n), row.tobytes()), key

    from jobs.runs import recent_runs

    recs = recent_runs(s, "incremental", client=redis_client)
    assert [r["status"] for r in recs[:2]] == ["lagging", "ok"]

"""The nightly job killed (SIGKILL) after each stage and in the middle of its publish: the
previous version keeps serving (pointer unchanged, its rows and metadata intact) and a re-run
completes and publishes. Real Spark, PyTorch, Faiss and Redis on a MovieLens-100K slice
(users 1..120, derived at test time), at tiny model sizes."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.serving_fixtures import last_day
from twotower import redis_keys
from twotower.config import Settings, load_settings

pytestmark = [pytest.mark.faults, pytest.mark.spark, pytest.mark.redis, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
CRASHES = ("nightly_after_prepare:1", "nightly_after_train:1", "nightly_after_index:1", "nightly_mid_publish:3")
RUN = "import sys, json; from jobs.nightly import run_nightly; from twotower.config import load_settings; " \
      "from twotower.contracts import parse_day; from twotower.logs import setup_logging; setup_logging(); " \
      "r = run_nightly(load_settings(), parse_day(sys.argv[1])); print(json.dumps(r.as_dict(), default=str))"


def tiny_env(state_dir: Path, prefix: str) -> dict[str, str]:
    """Environment of a small, fast nightly run (the subprocesses and the in-process run share it)."""
    return {
        "PYTHONPATH": str(ROOT), "TT_STATE_DIR": str(state_dir), "TT_REDIS_PREFIX": prefix,
        "TT_MODEL_DIM": "8", "TT_MODEL_ID_DIM": "8", "TT_MODEL_HIDDEN": "16",
        "TT_TRAIN_EPOCHS": "1", "TT_TRAIN_BATCH_SIZE": "256", "TT_TRAIN_THREADS": "1",
        "TT_INDEX_THREADS": "1", "TT_INDEX_EVAL_QUERIES": "100",
        "TT_SPARK_MASTER": "local[2]", "TT_SPARK_SHUFFLE_PARTITIONS": "4", "TT_SPARK_DRIVER_MEMORY": "1g",
        "TT_REDIS_BATCH_SIZE": "16", "TT_GATE_MAX_REGRESSION": "1.0",
    }  # fmt: skip


def run_nightly_process(env: dict[str, str], day: dt.date, crash: str | None, log: Path) -> int:
    full = {k: v for k, v in os.environ.items() if k not in ("TT_CRASH_AT", "TT_STREAM_CRASH_AT")}
    full.update(env)
    if crash:
        full["TT_CRASH_AT"] = crash
    with open(log, "ab") as out:
        return subprocess.run([sys.executable, "-c", RUN, day.isoformat()], cwd=ROOT, env=full, stdout=out, stderr=subprocess.STDOUT, timeout=600).returncode


def serving_state(client, s: Settings, version: str) -> dict:
    """Pointer, the version's metadata and every one of its rows (raw bytes)."""
    p = s.redis.prefix
    rows = {k: client.hgetall(k) for k in client.scan_iter(match=f"{p}:row:{version}:*", count=1000)}
    return {"pointer": client.hget(redis_keys.pointer(p), "current"), "meta": client.get(redis_keys.version_meta(p, version)), "rows": rows}


def test_nightly_killed_in_each_stage_keeps_the_previous_version_serving_and_a_rerun_completes(ml_small_raw_dir, redis_client, settings, tmp_path):
    from jobs.nightly import run_nightly

    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / "raw").symlink_to(ml_small_raw_dir, target_is_directory=True)
    env = tiny_env(state_dir, settings.redis.prefix)
    s = load_settings({**os.environ, **env, "REDIS_URL": settings.redis.url})
    day = last_day(ml_small_raw_dir)
    previous = run_nightly(s, day - dt.timedelta(days=14))  # the version serving before tonight
    assert previous.published, previous
    before = serving_state(redis_client, s, previous.version)
    assert before["pointer"].decode() == previous.version and len(before["rows"]) > 50

    log = tmp_path / "nightly.log"
    for point in CRASHES:
        assert run_nightly_process(env, day, point, log) == -signal.SIGKILL, log.read_text()[-3000:]
        assert serving_state(redis_client, s, previous.version) == before, f"serving changed after a kill at {point}"
    text = log.read_text()
    assert "publish" in text and "user rows written" in text  # the last kill was inside the publish

    assert run_nightly_process(env, day, None, log) == 0, log.read_text()[-3000:]
    result = json.loads(log.read_text().strip().splitlines()[-1])
    assert result["status"] == "published" and result["publish"]["previous"] == previous.version
    assert result["publish"]["rows_kept"] > 0  # the rows the killed publish wrote were kept, not rewritten
    after = serving_state(redis_client, s, result["version"])
    assert after["pointer"].decode() == result["version"] and after["meta"] is not None
    assert len(after["rows"]) == json.loads(after["meta"])["n_users"]
    assert serving_state(redis_client, s, previous.version)["rows"] == before["rows"]  # kept for rollback

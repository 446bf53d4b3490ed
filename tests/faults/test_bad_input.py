"""Bad input stops the nightly run with a clear message and publishes nothing: a corrupt raw
partition, no raw partition in the window, a loss that turns NaN, an index whose measured
recall is below the floor. Each runs jobs.nightly.run_nightly (real Spark, PyTorch, Faiss,
Redis) on a copy of the MovieLens-100K slice (users 1..120, derived at test time); afterwards
Redis holds no pointer, no version and no row, and the run record says why it failed."""

from __future__ import annotations

import datetime as dt
import shutil

import pytest

from jobs.runs import latest_run
from tests.serving_fixtures import last_day
from tests.faults.test_nightly_crash import tiny_env
from twotower.config import load_settings

pytestmark = [pytest.mark.faults, pytest.mark.spark, pytest.mark.redis, pytest.mark.slow]


def corrupt_last_partition(raw, day: dt.date) -> str:
    """Truncate a Parquet file of the newest day partition to half its bytes (a torn copy)."""
    part = raw / f"dt={day.isoformat()}"
    path = sorted(part.glob("*.parquet"))[0]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return part.name


CASES = {
    # name: (environment, how to break the input, logical date shift in days, error type, words in the message)
    "corrupt raw partition": ({}, corrupt_last_partition, 0, "PrepareError", ["unreadable", "corrupted"]),
    "no raw partition in the window": ({"TT_PREPARE_WINDOW_DAYS": "30"}, None, -400, "PrepareError", ["no raw partition in the window", "ingest"]),
    "raw partition of the logical date missing": ({}, None, 1, "PrepareError", ["waiting for raw partition", "would publish data that stops before"]),
    "NaN loss": ({"TT_MODEL_TEMPERATURE": "1e-45"}, None, 0, "TrainingDiverged", ["training diverged", "nothing was written"]),
    "index recall below the floor": ({"TT_INDEX_RECALL_FLOOR": "1.01"}, None, 0, "IndexQualityError", ["below the floor", "cannot be published"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_stops_the_run_and_publishes_nothing(case, ml_small_raw_dir, settings, redis_client, tmp_path, caplog):
    from jobs.nightly import run_nightly

    env, breaks, shift, error, words = CASES[case]
    state_dir = tmp_path / "state"
    shutil.copytree(ml_small_raw_dir, state_dir / "raw")
    s = load_settings({**tiny_env(state_dir, settings.redis.prefix), "REDIS_URL": settings.redis.url, **env})
    day = last_day(ml_small_raw_dir)
    if breaks is not None:
        words = [*words, breaks(s.paths.raw_dir, day)]  # the message names the broken partition
    with pytest.raises(Exception) as failed:
        run_nightly(s, day + dt.timedelta(days=shift))
    assert type(failed.value).__name__ == error, repr(failed.value)
    message = str(failed.value)
    assert all(w in message for w in words), message
    assert any(message in r.getMessage() and "serving version is unchanged" in r.getMessage() for r in caplog.records)

    keys = {k.decode().split(":")[1] for k in redis_client.scan_iter(match=f"{s.redis.prefix}:*")}
    assert keys == {"runs"}, keys  # no pointer, version, row or history: nothing published
    record = latest_run(s, "full_retrain", client=redis_client)
    assert record["status"] == "failed" and error in record["details"]["error"]
    assert not list(s.paths.artifacts_dir.glob("*/index.json"))  # no version became publishable

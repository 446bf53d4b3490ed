"""Shared fixtures: isolated settings per test, one Spark session per test run, real Redis,
and small MovieLens-100K-derived raw data built at test time (never committed)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from twotower.config import Settings, load_settings

ML_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ml-100k"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Settings with a private state dir and a private Redis key prefix."""
    s = load_settings()
    s = s.replace("paths", state_dir=tmp_path / "state")
    return s.replace("redis", prefix=f"tt-test-{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="session")
def spark():
    """One local SparkSession for the whole test run (start-up is ~15 s)."""
    from jobs.spark import get_spark

    session = get_spark(load_settings().spark.__class__(master="local[2]", shuffle_partitions=4, driver_memory="2g"))
    yield session
    session.stop()


@pytest.fixture
def redis_client(settings: Settings):
    """A client on the real Redis from REDIS_URL; deletes this test's prefix afterwards."""
    import redis

    client = redis.Redis.from_url(settings.redis.url)
    client.ping()  # a missing Redis is an error, not a skip: CI has one
    yield client
    for key in client.scan_iter(match=f"{settings.redis.prefix}:*", count=1000):
        client.delete(key)
    client.close()


@pytest.fixture(scope="session")
def ml_dir() -> Path:
    if not (ML_DIR / "u.data").exists():
        pytest.fail(f"MovieLens-100K is expected at {ML_DIR} (shared/data, as on CI)")
    return ML_DIR


@pytest.fixture(scope="session")
def ml_raw_dir(ml_dir: Path, tmp_path_factory) -> Path:
    """All of MovieLens-100K ingested into raw day partitions (read-only for tests)."""
    from jobs.ingest import ingest_movielens

    raw = tmp_path_factory.mktemp("ml_raw") / "raw"
    ingest_movielens(ml_dir, raw)
    return raw


@pytest.fixture(scope="session")
def ml_small_raw_dir(ml_dir: Path, tmp_path_factory) -> Path:
    """A small slice derived at test time: users 1..120 of MovieLens-100K, all their events."""
    from jobs.ingest import (
        movielens_item_attrs,
        movielens_user_attrs,
        normalise_events,
        read_movielens_ratings,
        write_attr_table,
        write_raw_events,
    )

    raw = tmp_path_factory.mktemp("ml_small_raw") / "raw"
    table = read_movielens_ratings(ml_dir)
    table = table.filter(pc.less_equal(pc.cast(table["user_id"], pa.int32()), 120))
    events, _ = normalise_events(table, "ml-100k users<=120")
    write_raw_events(events, raw)
    users = dict(movielens_user_attrs(x) for x in (ml_dir / "u.user").read_text(encoding="latin-1").splitlines() if x)
    items = dict(movielens_item_attrs(x) for x in (ml_dir / "u.item").read_text(encoding="latin-1").splitlines() if x)
    write_attr_table({u: a for u, a in users.items() if int(u) <= 120}, "users", raw)
    write_attr_table(items, "items", raw)
    return raw

"""Publishing versions to the real Redis: exact rows, histories and metadata; the atomic pointer
switch; a crash mid-publish; deletion of old versions; no silent rollback to an older cutoff."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from jobs.publish import publish_version, versions_to_delete
from tests.model_fixtures import write_tiny_prepared
from tests.publish_fixtures import clone_version, tiny_settings
from twotower import redis_keys
from twotower.config import Settings
from twotower.contracts import ARTIFACT_FILES

DAY_MS = 86_400_000
IDLE_USER = "u25"
"""In the vocabulary (kept from an earlier partition) but without any event in the window, so
without a training example: its published row must be the OOV row 0."""


class Crash(RuntimeError):
    pass


def add_idle_user(prepared, user_id: str) -> None:
    """Append ``user_id`` to the partition's user vocabulary (and users table, no attributes)
    without any example or history, as prepare does for a user of an earlier vocabulary who
    had no event in this window."""
    vocab = pq.read_table(prepared / "vocab_users.parquet")
    idx = len(vocab) + 1
    new = pa.table({"user_id": [user_id], "idx": pa.array([idx], pa.int32())})
    pq.write_table(pa.concat_tables([vocab, new.cast(vocab.schema)]), prepared / "vocab_users.parquet")
    users = pq.read_table(prepared / "users.parquet")
    new = pa.table({"user_idx": pa.array([idx], pa.int32()), "user_id": [user_id], "attrs": pa.array([[]], pa.list_(pa.int32()))})
    pq.write_table(pa.concat_tables([users, new.cast(users.schema)]), prepared / "users.parquet")
    manifest = json.loads((prepared / "manifest.json").read_text())
    (prepared / "manifest.json").write_text(json.dumps({**manifest, "n_users": idx}, indent=2, sort_keys=True))


@pytest.fixture(scope="module")
def base_version(tmp_path_factory):
    """One trained+evaluated+indexed tiny version (24 users with examples and the idle user),
    shared by this module's tests (copied per test)."""
    from jobs.evaluate import evaluate_exact
    from jobs.index import build_index
    from jobs.train import train_version
    from twotower.config import load_settings

    root = tmp_path_factory.mktemp("publish_base")
    s = tiny_settings(load_settings().replace("paths", state_dir=root / "state"))
    prepared = write_tiny_prepared(s.paths.prepared_dir)
    add_idle_user(prepared, IDLE_USER)
    artifact = train_version(s, prepared)
    evaluate_exact(s, artifact, prepared)
    build_index(s, artifact, prepared)
    return artifact, prepared


@pytest.fixture
def s(settings: Settings, base_version) -> Settings:
    import shutil

    artifact, prepared = base_version
    shutil.copytree(prepared, settings.paths.prepared_dir / prepared.name)
    shutil.copytree(artifact, settings.paths.artifacts_dir / artifact.name)
    return tiny_settings(settings).replace("redis", batch_size=5)


def versions(s: Settings):
    """Three versions with increasing data cutoffs and distinct user rows."""
    v1 = next(s.paths.artifacts_dir.iterdir())
    cutoff = json.loads((v1 / "manifest.json").read_text())["data_cutoff_ms"]
    v2 = clone_version(v1, "20240131-00000002", cutoff + DAY_MS, row_scale=2.0)
    v3 = clone_version(v1, "20240201-00000003", cutoff + 2 * DAY_MS, row_scale=3.0)
    return v1, v2, v3


def expected_rows(artifact) -> dict[str, bytes]:
    state = torch.load(artifact / ARTIFACT_FILES["model"], weights_only=True)
    table = state["user_id_embedding.weight"].numpy().astype("<f4")
    vocab = pq.read_table(artifact / ARTIFACT_FILES["vocab_users"]).to_pydict()
    return {u: table[i].tobytes() for u, i in zip(vocab["user_id"], vocab["idx"])}


def pointer(redis_client, s):
    return {k.decode(): v.decode() for k, v in redis_client.hgetall(redis_keys.pointer(s.redis.prefix)).items()}


def row_keys(redis_client, s, version):
    return list(redis_client.scan_iter(match=f"{s.redis.prefix}:row:{version}:*", count=1000))


def test_publish_writes_exact_rows_histories_and_metadata(s, redis_client):
    v1, _, _ = versions(s)
    p = s.redis.prefix
    result = publish_version(s, v1, client=redis_client)
    assert result["switched"] is True and result["previous"] is None
    assert (result["rows_written"], result["rows_kept"], result["histories_written"]) == (25, 0, 24)
    assert result["users_without_examples"] == 1

    ptr = pointer(redis_client, s)
    assert ptr["current"] == v1.name and "previous" not in ptr
    for user_id, row in expected_rows(v1).items():
        stored = redis_client.hgetall(redis_keys.user_row(p, v1.name, user_id))
        assert stored == {b"e": row, b"w": b"-1", b"n": b"0"}
    oov_row = torch.load(v1 / ARTIFACT_FILES["model"], weights_only=True)["user_id_embedding.weight"][0]
    idle = redis_client.hget(redis_keys.user_row(p, v1.name, IDLE_USER), "e")
    assert idle == oov_row.numpy().astype("<f4").tobytes()
    assert redis_client.hget(redis_keys.user_row(p, v1.name, "u1"), "e") != idle  # trained users keep their own row

    hist = pq.read_table(s.paths.prepared_dir / "dt=2024-01-30" / "user_history.parquet").to_pydict()
    for u, items, ts, eids in zip(hist["user_idx"], hist["hist"], hist["hist_ts"], hist["hist_event_ids"]):
        got = redis_client.zrange(redis_keys.user_history(p, f"u{u}"), 0, -1, withscores=True)
        assert [(m.decode(), int(sc)) for m, sc in got] == [(f"{e}\ti{i}", t) for i, t, e in zip(items, ts, eids)]

    meta = json.loads(redis_client.get(redis_keys.version_meta(p, v1.name)))
    manifest = json.loads((v1 / "manifest.json").read_text())
    assert meta["version"] == v1.name and meta["artifact_dir"] == str(v1.resolve())
    assert meta["data_cutoff_ms"] == manifest["data_cutoff_ms"] == 1_706_659_200_000
    assert meta["data_cutoff"] == "2024-01-31T00:00:00.000Z"
    assert (meta["n_users"], meta["n_items"], meta["id_dim"], meta["history_len"]) == (25, 30, 8, 5)
    assert meta["users_without_examples"] == manifest["users_without_examples"] == 1
    assert meta["metrics"] == json.loads((v1 / "metrics.json").read_text())
    assert meta["index"]["type"] == "Flat" and meta["index"]["n_items"] == 30
    assert meta["trained_at"] == manifest["trained_at"]
    assert redis_client.zscore(redis_keys.versions(p), v1.name) == meta["published_at_ms"]


def test_crash_mid_publish_keeps_the_old_version_serving_and_a_rerun_completes(s, redis_client):
    v1, v2, _ = versions(s)
    p = s.redis.prefix
    publish_version(s, v1, client=redis_client)
    before = pointer(redis_client, s)

    def crash_after_two_batches(batch: int, done: int) -> None:
        if batch == 2:
            raise Crash(f"killed after {done} users")

    with pytest.raises(Crash):
        publish_version(s, v2, client=redis_client, on_batch=crash_after_two_batches)
    assert pointer(redis_client, s) == before  # serving untouched
    assert redis_client.get(redis_keys.version_meta(p, v2.name)) is None  # not marked complete
    assert len(row_keys(redis_client, s, v2.name)) == 10  # two batches of 5 got in
    assert len(row_keys(redis_client, s, v1.name)) == 25

    result = publish_version(s, v2, client=redis_client)
    assert result["switched"] is True and result["previous"] == v1.name
    assert (result["rows_written"], result["rows_kept"]) == (15, 10)
    for user_id, row in expected_rows(v2).items():
        assert redis_client.hget(redis_keys.user_row(p, v2.name, user_id), "e") == row
    assert pointer(redis_client, s)["current"] == v2.name
    assert pointer(redis_client, s)["previous"] == v1.name


def test_old_versions_are_deleted_and_the_previous_one_kept(s, redis_client):
    v1, v2, v3 = versions(s)
    p = s.redis.prefix
    for v in (v1, v2):
        publish_version(s, v, client=redis_client)
    result = publish_version(s, v3, client=redis_client)
    assert result["deleted_versions"] == [v1.name]
    assert row_keys(redis_client, s, v1.name) == []
    assert redis_client.get(redis_keys.version_meta(p, v1.name)) is None
    assert len(row_keys(redis_client, s, v2.name)) == 25 and len(row_keys(redis_client, s, v3.name)) == 25
    assert {v.decode() for v in redis_client.zrange(redis_keys.versions(p), 0, -1)} == {v2.name, v3.name}
    ptr = pointer(redis_client, s)
    assert (ptr["current"], ptr["previous"]) == (v3.name, v2.name)
    # histories are facts about users, shared by versions: still there
    assert redis_client.zcard(redis_keys.user_history(p, "u1")) == 5


def test_older_cutoff_does_not_move_the_pointer_back_without_force(s, redis_client):
    v1, v2, _ = versions(s)
    p = s.redis.prefix
    publish_version(s, v2, client=redis_client)
    refused = publish_version(s, v1, client=redis_client)
    assert refused["switched"] is False and "newer" in refused["reason"] and "force" in refused["reason"]
    assert refused["rows_written"] == 0 and row_keys(redis_client, s, v1.name) == []  # nothing written
    assert pointer(redis_client, s)["current"] == v2.name

    forced = publish_version(s, v1, force=True, client=redis_client)
    assert forced["switched"] is True
    ptr = pointer(redis_client, s)
    assert (ptr["current"], ptr["previous"]) == (v1.name, v2.name)
    assert redis_client.get(redis_keys.version_meta(p, v1.name)) is not None


def test_republishing_the_serving_version_changes_nothing(s, redis_client):
    v1, _, _ = versions(s)
    p = s.redis.prefix
    publish_version(s, v1, client=redis_client)
    key = redis_keys.user_row(p, v1.name, "u3")
    moved = np.arange(8, dtype="<f4").tobytes()
    redis_client.hset(key, mapping={"e": moved, "w": 1_706_662_800_000, "n": 4})  # as the hourly updater would
    switched_at = pointer(redis_client, s)["switched_at_ms"]
    again = publish_version(s, v1, client=redis_client)
    assert again["switched"] is False and "already serving" in again["reason"]
    assert redis_client.hgetall(key) == {b"e": moved, b"w": b"1706662800000", b"n": b"4"}
    assert pointer(redis_client, s)["switched_at_ms"] == switched_at


def test_an_unindexed_version_is_not_published(s, redis_client):
    v1, _, _ = versions(s)
    (v1 / ARTIFACT_FILES["index_meta"]).unlink()
    with pytest.raises(FileNotFoundError, match="index stage"):
        publish_version(s, v1, client=redis_client)
    assert pointer(redis_client, s) == {}


def test_versions_to_delete_rule():
    ptr = {"current": "c", "previous": "b"}
    assert versions_to_delete(ptr, ["d", "c", "b", "a"], keep=2) == ["d", "a"]
    assert versions_to_delete(ptr, ["c", "b", "a"], keep=3) == []
    assert versions_to_delete(ptr, ["c", "b", "a"], keep=1) == ["a"]  # current and previous are never deleted
    assert versions_to_delete({}, ["b", "a"], keep=1) == ["a"]


def test_missing_prepared_history_fails_before_writing_anything(s, redis_client):
    v1, _, _ = versions(s)
    (s.paths.prepared_dir / "dt=2024-01-30" / "user_history.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="user_history.parquet"):
        publish_version(s, v1, client=redis_client)
    assert list(redis_client.scan_iter(match=f"{s.redis.prefix}:*")) == []


def test_rollback_swaps_current_and_previous(s, redis_client):
    from jobs.publish import rollback

    v1, v2, _ = versions(s)
    assert rollback(s, client=redis_client)["switched"] is False  # nothing to roll back to
    publish_version(s, v1, client=redis_client)
    publish_version(s, v2, client=redis_client)
    assert rollback(s, client=redis_client) == {"switched": True, "current": v1.name, "previous": v2.name}
    ptr = pointer(redis_client, s)
    assert (ptr["current"], ptr["previous"]) == (v1.name, v2.name)
    assert int(ptr["current_cutoff_ms"]) + DAY_MS == int(ptr["previous_cutoff_ms"])
    # publishing the newer v2 again is a normal forward switch
    assert publish_version(s, v2, client=redis_client)["switched"] is True
    assert pointer(redis_client, s)["current"] == v2.name


def test_publish_trims_history_only_before_the_cutoff(s, redis_client):
    """Events after the cutoff (written by the hourly path) survive a publish; before the cutoff
    only the newest L (= 5 here) are kept."""
    v1, _, _ = versions(s)
    p = s.redis.prefix
    key = redis_keys.user_history(p, "u1")
    cutoff = 1_706_659_200_000
    redis_client.zadd(key, {"late-1\ti3": cutoff + 1_000, "late-2\ti4": cutoff + 2_000, "old-0\ti9": 1})
    publish_version(s, v1, client=redis_client)
    members = redis_client.zrange(key, 0, -1, withscores=True)
    before = [m for m, sc in members if sc < cutoff]
    after = [m.decode() for m, sc in members if sc >= cutoff]
    assert len(before) == 5 and b"old-0\ti9" not in before
    assert after == ["late-1\ti3", "late-2\ti4"]

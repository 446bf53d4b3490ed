"""The serving API over real HTTP (uvicorn on a free port) against a version published by the
real nightly pipeline (MovieLens-100K users 1..120; see tests.serving_fixtures)."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from urllib.parse import quote

import httpx
import pytest

from serving import freshness as fr
from serving.app import create_app, user_id_problem
from serving.recall import recall
from tests.serving_fixtures import ServerThread, clone_deployment, delete_prefix, publish_other_version, shared_deployment
from twotower import redis_keys
from twotower.config import ServingConfig

pytestmark = [pytest.mark.spark, pytest.mark.redis, pytest.mark.slow]


@pytest.fixture(scope="module")
def rclient():
    from jobs.redis_conn import redis_client
    from twotower.config import load_settings

    client = redis_client(load_settings())
    yield client
    client.close()


@pytest.fixture(scope="module")
def base(spark, ml_small_raw_dir, tmp_path_factory):
    """The session's version built by the real nightly pipeline (shared with the dashboard test)."""
    return shared_deployment(ml_small_raw_dir, tmp_path_factory.mktemp("serving_shared"))


@pytest.fixture(scope="module")
def deployment(base, rclient):
    """That version published under this module's own Redis prefix."""
    dep = clone_deployment(base, rclient)
    yield dep
    delete_prefix(rclient, dep.settings.redis.prefix)


@pytest.fixture(scope="module")
def server(deployment, rclient):
    with ServerThread(create_app(deployment.settings)) as srv:
        yield srv


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def history_items(rclient, prefix: str, user_id: str) -> list[str]:
    return [redis_keys.history_item(m) for m in rclient.zrange(redis_keys.user_history(prefix, user_id), 0, -1)]


# --- /recall ---------------------------------------------------------------------------------------


def test_recall_known_user_matches_the_library_and_excludes_history(deployment, http, rclient):
    r = http.get("/recall/1", params={"k": 25})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["version"] == deployment.version
    assert body["cold_start"] is False
    assert body["history_used"] == deployment.settings.prepare.history_len  # user 1 rated 272 films
    items = [x["item_id"] for x in body["items"]]
    assert len(items) == 25 and len(set(items)) == 25
    assert set(items) <= set(deployment.items)
    scores = [x["score"] for x in body["items"]]
    assert scores == sorted(scores, reverse=True)
    assert not set(items) & set(history_items(rclient, deployment.settings.redis.prefix, "1"))
    # the HTTP path answers exactly what the library function answers on the same Redis state
    want = recall(deployment.settings, "1", 25, client=rclient)
    assert items == [i for i, _ in want]
    assert scores == pytest.approx([s for _, s in want], abs=1e-5)


def test_recall_cold_start_user_gets_an_answer_that_uses_its_history(deployment, http, rclient):
    r = http.get("/recall/never-seen-user", params={"k": 10})
    assert r.status_code == 200, r.text
    cold = r.json()
    assert cold["cold_start"] is True and cold["history_used"] == 0 and len(cold["items"]) == 10

    # a new user the stream has seen (history in Redis, no row yet): history is used and excluded
    prefix = deployment.settings.redis.prefix
    watched = [x["item_id"] for x in cold["items"][:3]]
    key = redis_keys.user_history(prefix, "stream-only-user")
    rclient.zadd(key, {redis_keys.history_member(f"ev{i}", item): 1_000 + i for i, item in enumerate(watched)})
    r = http.get("/recall/stream-only-user", params={"k": 10})
    body = r.json()
    assert r.status_code == 200 and body["cold_start"] is True and body["history_used"] == 3
    assert not set(watched) & {x["item_id"] for x in body["items"]}
    assert [x["item_id"] for x in body["items"]] != [x["item_id"] for x in cold["items"]]


@pytest.mark.parametrize("k", ["0", "-3", "1001", "ten", "2.5", ""])
def test_recall_k_out_of_range_is_422_with_a_json_message(http, k):
    r = http.get("/recall/1", params={"k": k})
    assert r.status_code == 422
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["detail"]


def test_recall_k_bounds_inclusive(deployment, http):
    assert len(http.get("/recall/1", params={"k": 1}).json()["items"]) == 1
    big = http.get("/recall/1", params={"k": 1000})
    assert big.status_code == 200
    assert len(big.json()["items"]) == 1000  # 1,682 items, 50 history items excluded: 1,000 remain
    assert len(http.get("/recall/1").json()["items"]) == deployment.settings.serving.default_k


@pytest.mark.parametrize(
    "user_id, status",
    [
        ("x" * 256, 200),  # longest accepted: served as a cold start
        ("x" * 257, 422),
        (" 1", 422),  # surrounding blank
        ("1 ", 422),
        ("a\x01b", 422),  # control character
        ("a\x7fb", 422),
        ("josé-ü", 200),  # any other text is an id the stream accepts
    ],
)
def test_recall_user_id_rules(http, user_id, status):
    r = http.get("/recall/" + quote(user_id, safe=""))
    assert r.status_code == status, (user_id, r.text)
    if status == 422:
        assert isinstance(r.json()["detail"], str)


def test_user_id_rule_is_the_stream_consumers_rule():
    from streaming.events import Limits, _check_id

    cfg = ServingConfig()
    for uid in ["1", "x" * 256, "x" * 257, " a", "a ", "a\tb", "a\x7f", "\ud800", "Ωmega", "e@mail.com", "{u:1}", "  "]:
        assert (user_id_problem(uid, cfg) is None) == (_check_id("user_id", uid, Limits()) is None), repr(uid)


# --- /freshness and /metrics -----------------------------------------------------------------------


def test_freshness_reports_the_published_version(deployment, http):
    t_before = time.time() * 1000
    body = http.get("/freshness").json()
    manifest = json.loads((deployment.artifact_dir / "manifest.json").read_text())
    index = json.loads((deployment.artifact_dir / "index.json").read_text())
    f = body["freshness"]
    assert body["current_version"] == f["version"] == f["serving_version"] == deployment.version
    assert f["model_trained_at_ms"] == int(manifest["trained_at"] * 1000)
    assert f["data_cutoff_ms"] == manifest["data_cutoff_ms"]
    assert f["model_age_s"] == pytest.approx((f["now_ms"] - f["model_trained_at_ms"]) / 1000, abs=1e-3)
    assert f["now_ms"] >= t_before
    assert f["index_n_items"] == index["n_items"] == len(deployment.items)
    assert f["ann_recall_at_100"] == index["ann_recall_at_100"]
    retrain = f["last_full_retrain"]
    assert retrain["status"] == "published" and retrain["version"] == deployment.version
    assert retrain["gate"]["passed"] is True
    assert retrain["duration_s"] > 0 and set(retrain["stage_seconds"]) >= {"prepare", "train", "index", "publish"}
    assert retrain["metrics"]["hit@50"] == pytest.approx(body["metrics"]["hit@50"])
    assert f["model_stale"] is False and f["incremental_stale"] is False and f["stale_reasons"] == []
    assert f["last_incremental_publish_ms"] is None and f["consumer_lag"] == {}


def metric_values(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_metrics_expose_requests_and_freshness(deployment, http):
    before = metric_values(http.get("/metrics").text)
    for _ in range(3):
        assert http.get("/recall/2", params={"k": 5}).status_code == 200
    assert http.get("/recall/2", params={"k": 0}).status_code == 422
    after = metric_values(http.get("/metrics").text)
    ok = 'tt_recall_requests_total{code="200"}'
    assert after[ok] - before.get(ok, 0) == 3
    bad = 'tt_recall_requests_total{code="422"}'
    assert after[bad] - before.get(bad, 0) == 1
    assert after["tt_recall_latency_seconds_count"] - before.get("tt_recall_latency_seconds_count", 0) == 4
    assert after[f'tt_model_version_info{{previous="",version="{deployment.version}"}}'] == 1
    assert after["tt_index_items"] == len(deployment.items)
    assert 0.9 <= after["tt_index_ann_recall_at_100"] <= 1.0
    assert 0 <= after["tt_model_version_age_seconds"] < 24 * 3600
    assert after['tt_stale{what="model"}'] == 0 and after['tt_stale{what="incremental"}'] == 0
    assert after["tt_freshness_up"] == 1
    text = http.get("/metrics").text
    for name in ("tt_incremental_last_publish_age_seconds", "tt_watermark_lag_seconds", "tt_consumer_lag_records",
                 "tt_dead_letters", "tt_recall_cold_start_total", "tt_serving_version_switches_total"):  # fmt: skip
        assert f"# TYPE {name}" in text or f"# TYPE {name.removesuffix('_total')}" in text, name


def test_freshness_history_survives_a_restart(deployment, rclient):
    """Samples live in Redis: a new server process (a new app) charts what the old one recorded."""
    prefix = deployment.settings.redis.prefix
    cfg = deployment.settings.serving
    now = int(time.time() * 1000)
    for minutes_ago, age in [(90, 5400.0), (30, 1800.0)]:
        assert fr.record_sample(rclient, prefix, {"now_ms": now - minutes_ago * 60_000, "model_age_s": age}, cfg, force=True)
    with ServerThread(create_app(deployment.settings)) as srv:
        hist = httpx.get(srv.url + "/freshness/history", params={"hours": 3}, timeout=30).json()
    ages = hist["samples"]["model_age_s"]
    assert [now - 90 * 60_000, 5400.0] in ages and [now - 30 * 60_000, 1800.0] in ages
    assert [p[0] for p in ages] == sorted(p[0] for p in ages)
    assert len(hist["hours"]) == 3 and hist["users_updated"] == [0, 0, 0]


# --- version switch --------------------------------------------------------------------------------


@pytest.fixture
def own_deployment(base, rclient):
    """The base version under a prefix of this test alone (it moves the pointer)."""
    dep = clone_deployment(base, rclient)
    yield dep
    delete_prefix(rclient, dep.settings.redis.prefix)


def test_pointer_switch_under_load_fails_no_request(own_deployment, rclient):
    """Hammer /recall from 4 threads while a second nightly version is trained, indexed and
    published: every answer is 200, and the server moves to the new version by itself."""
    deployment = own_deployment
    with ServerThread(create_app(deployment.settings)) as server:
        _switch_under_load(deployment, server, rclient)


def _switch_under_load(deployment, server, rclient) -> None:
    stop = threading.Event()
    results: list[tuple[float, int, str | None]] = []
    lock = threading.Lock()

    def hammer(worker: int) -> None:
        users = deployment.users + ["cold-start-user"]
        i = worker
        with httpx.Client(base_url=server.url, timeout=60) as client:
            while not stop.is_set():
                r = client.get(f"/recall/{users[i % len(users)]}", params={"k": 50})
                version = r.json().get("version") if r.status_code == 200 else None
                with lock:
                    results.append((time.time(), r.status_code, version))
                i += 4

    threads = [threading.Thread(target=hammer, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        new_version = publish_other_version(deployment, seed=7)
        switched_at = time.time()
        deadline = switched_at + 60
        while time.time() < deadline:
            with lock:
                if sum(1 for t, _, v in results if t > switched_at and v == new_version) >= 20:
                    break
            time.sleep(0.1)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)

    codes = Counter(code for _, code, _ in results)
    assert codes == {200: len(results)}, codes
    versions = [v for _, _, v in results]
    assert new_version != deployment.version
    assert deployment.version in versions and new_version in versions
    first_new = versions.index(new_version)
    assert all(v == new_version for v in versions[first_new + 4 * 4 :])  # in-flight stragglers aside, never back
    assert rclient.hget(redis_keys.pointer(deployment.settings.redis.prefix), "previous").decode() == deployment.version
    body = httpx.get(server.url + "/freshness", timeout=30).json()
    assert body["freshness"]["serving_version"] == body["current_version"] == new_version
    assert metric_values(httpx.get(server.url + "/metrics", timeout=30).text)["tt_serving_version_switches_total"] >= 2


def test_unloadable_version_keeps_the_old_one_serving(deployment, rclient):
    """A pointer to a version whose artifacts cannot be read: answers keep coming from the loaded
    version, /readyz stays 200 and names the error; restoring the pointer clears it."""
    prefix = deployment.settings.redis.prefix
    pointer = redis_keys.pointer(prefix)
    saved = rclient.hgetall(pointer)
    with ServerThread(create_app(deployment.settings.replace("serving", pointer_check_s=0.1))) as srv:
        serving = httpx.get(srv.url + "/recall/3", timeout=30).json()["version"]
        rclient.set(redis_keys.version_meta(prefix, "broken-v"), json.dumps({"artifact_dir": "/nonexistent/broken-v"}))
        try:
            rclient.hset(pointer, "current", "broken-v")
            deadline = time.time() + 20
            ready = {}
            while time.time() < deadline:
                ready = httpx.get(srv.url + "/readyz", timeout=30).json()
                if ready["error"]:
                    break
                time.sleep(0.1)
            assert "broken-v" in (ready["error"] or "")
            assert ready["loaded_version"] == serving
            for uid in ("3", "4", "new-person"):
                r = httpx.get(srv.url + f"/recall/{uid}", timeout=30)
                assert r.status_code == 200 and r.json()["version"] == serving
        finally:
            rclient.delete(pointer)
            rclient.hset(pointer, mapping=saved)
            rclient.delete(redis_keys.version_meta(prefix, "broken-v"))
        deadline = time.time() + 20
        while time.time() < deadline and httpx.get(srv.url + "/readyz", timeout=30).json()["error"]:
            time.sleep(0.1)
        assert httpx.get(srv.url + "/readyz", timeout=30).json()["error"] is None


# --- pure: derived freshness and its metrics ---------------------------------------------------------

HOUR_S = 3600
T0_MS = 1_800_000_000_000


def raw_state(trained_ago_s: float | None, incr_ago_s: float | None, published_ago_s: float = 60.0, version: str | None = "v2",
              archive_ago_s: float | None = None):
    meta = None
    if version:
        meta = {
            "trained_at": (T0_MS - trained_ago_s * 1000) / 1000 if trained_ago_s is not None else None,
            "published_at_ms": T0_MS - int(published_ago_s * 1000),
            "data_cutoff_ms": 1_700_000_000_000,
            "index": {"type": "IVF-PQ", "factory": "IVF64,PQ16", "nprobe": 8, "n_items": 5000, "ann_recall_at_100": 0.961},
        }
    incr = None
    if incr_ago_s is not None:
        incr = {
            "version": version, "last_publish_at": T0_MS - int(incr_ago_s * 1000), "watermark": T0_MS - 5400_000,
            "last_window": T0_MS - 3 * 3600_000, "users_updated": 40, "events_applied": 300,
            "consumer_lag": {0: 7, 1: 0, 3: 5}, "dead_letters": 4,
        }  # fmt: skip
    status = {"current_version": version, "previous_version": "v1" if version else None}
    archive = None
    if archive_ago_s is not None:
        archive = {"checked_at": T0_MS - int(archive_ago_s * 1000), "landed_at": T0_MS - int(archive_ago_s * 1000) - 60_000,
                   "newest_event_ts": T0_MS - 7200_000, "events_written": 5, "duplicates_skipped": 0, "invalid": 0, "status": "ok"}  # fmt: skip
    return {"status": status, "meta": meta, "retrain": None, "incremental": incr, "archive": archive}


@pytest.mark.parametrize("trained_ago_s, stale", [(36 * HOUR_S - 1, False), (36 * HOUR_S + 1, True)])
def test_model_stale_after_36_hours(trained_ago_s, stale):
    f = fr.derive(raw_state(trained_ago_s, 60), T0_MS, ServingConfig())
    assert f["model_age_s"] == trained_ago_s
    assert f["model_stale"] is stale
    assert any("model v2" in r for r in f["stale_reasons"]) is stale


@pytest.mark.parametrize("incr_ago_s, stale", [(2 * HOUR_S - 1, False), (2 * HOUR_S + 1, True)])
def test_incremental_stale_after_2_hours_without_publish(incr_ago_s, stale):
    f = fr.derive(raw_state(HOUR_S, incr_ago_s), T0_MS, ServingConfig())
    assert f["incremental_age_s"] == incr_ago_s
    assert f["incremental_stale"] is stale
    assert any("last incremental publish" in r for r in f["stale_reasons"]) is stale


def test_never_published_incrementally_counts_from_the_version_publish():
    assert fr.derive(raw_state(HOUR_S, None, published_ago_s=HOUR_S), T0_MS, ServingConfig())["incremental_stale"] is False
    f = fr.derive(raw_state(3 * HOUR_S, None, published_ago_s=3 * HOUR_S), T0_MS, ServingConfig())
    assert f["incremental_stale"] is True and f["incremental_age_s"] is None
    assert f["stale_reasons"] == ["no incremental publish since the version was published 3.0 h ago (limit 2.0 h)"]


def test_nothing_published_is_flagged_without_incremental_noise():
    f = fr.derive(raw_state(None, None, version=None), T0_MS, ServingConfig())
    assert f["version"] is None and f["model_stale"] is True and f["incremental_stale"] is False
    assert f["stale_reasons"] == ["no model version is published"]


def test_derived_lag_dead_letters_and_index():
    f = fr.derive(raw_state(HOUR_S, 600), T0_MS, ServingConfig())
    assert f["consumer_lag"] == {"0": 7, "1": 0, "3": 5} and f["consumer_lag_total"] == 12
    assert f["dead_letters"] == 4
    assert f["watermark_lag_s"] == 5400.0 and f["watermark_stale"] is False
    assert f["index_n_items"] == 5000 and f["ann_recall_at_100"] == 0.961
    assert f["index_type"] == "IVF-PQ (IVF64,PQ16, nprobe 8)"
    assert f["users_updated_last_hour"] == 40 and f["events_applied_last_hour"] == 300


@pytest.mark.parametrize("archive_ago_s, stale", [(None, False), (2 * HOUR_S - 1, False), (2 * HOUR_S + 1, True)])
def test_archive_stale_after_2_hours_without_a_run(archive_ago_s, stale):
    from serving.metrics import ServingMetrics

    f = fr.derive(raw_state(HOUR_S, 600, archive_ago_s=archive_ago_s), T0_MS, ServingConfig())
    assert f["archive_age_s"] == archive_ago_s and f["archive_stale"] is stale
    assert any("the archiver last landed the stream" in r for r in f["stale_reasons"]) is stale
    if archive_ago_s is not None:
        assert f["raw_newest_event_ms"] == T0_MS - 7200_000 and f["archive_landed_ms"] == T0_MS - int(archive_ago_s * 1000) - 60_000
    values = metric_values(ServingMetrics(lambda: f).render().decode())
    assert values['tt_stale{what="archive"}'] == int(stale)
    assert values.get("tt_archive_last_run_age_seconds") == archive_ago_s  # absent when it never ran
    # nothing published: nothing to land for, so no archive noise
    assert fr.derive(raw_state(None, None, version=None, archive_ago_s=10 * HOUR_S), T0_MS, ServingConfig())["archive_stale"] is False


def test_freshness_gauges_carry_the_derived_values():
    from serving.metrics import ServingMetrics

    f = fr.derive(raw_state(10 * HOUR_S, 3 * HOUR_S), T0_MS, ServingConfig())
    values = metric_values(ServingMetrics(lambda: f).render().decode())
    assert values["tt_model_version_age_seconds"] == 36000.0
    assert values["tt_incremental_last_publish_age_seconds"] == 10800.0
    assert values["tt_watermark_lag_seconds"] == 5400.0
    assert values['tt_consumer_lag_records{partition="0"}'] == 7 and values['tt_consumer_lag_records{partition="3"}'] == 5
    assert values["tt_consumer_lag_total_records"] == 12
    assert values["tt_dead_letters_total"] == 4
    assert values["tt_index_items"] == 5000 and values["tt_index_ann_recall_at_100"] == 0.961
    assert values['tt_stale{what="incremental"}'] == 1 and values['tt_stale{what="model"}'] == 0
    assert values['tt_model_version_info{previous="v1",version="v2"}'] == 1


def test_freshness_gauges_report_redis_down_instead_of_failing_the_scrape():
    from serving.metrics import ServingMetrics

    def broken():
        raise ConnectionError("Redis is down")

    metrics = ServingMetrics(broken)
    metrics.observe(200, 0.004)
    values = metric_values(metrics.render().decode())
    assert values["tt_freshness_up"] == 0 and values['tt_recall_requests_total{code="200"}'] == 1


def test_hour_slots_end_at_the_last_hour():
    assert fr.hour_slots(T0_MS + 1234, 3) == [T0_MS - 2 * 3600_000, T0_MS - 3600_000, T0_MS]


# --- infra files: Prometheus scrape config and the Grafana dashboard query our metric names -----------


def test_grafana_dashboard_queries_only_metrics_the_server_exposes():
    import re

    import yaml

    from serving.metrics import ServingMetrics
    from twotower.config import PROJECT_ROOT

    exposed = ServingMetrics(lambda: fr.derive(raw_state(HOUR_S, 600), T0_MS, ServingConfig())).render().decode()
    names = {line.split()[2] for line in exposed.splitlines() if line.startswith("# TYPE")}
    series = set(names) | {n + "_total" for n in names} | {n + "_bucket" for n in names}
    dash = json.loads((PROJECT_ROOT / "infra" / "grafana_dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\btt_[a-z0-9_]+", e)}
    assert used and used <= series, used - series
    assert {"tt_model_version_age_seconds", "tt_incremental_last_publish_age_seconds", "tt_watermark_lag_seconds",
            "tt_consumer_lag_records", "tt_dead_letters_total", "tt_index_items", "tt_index_ann_recall_at_100",
            "tt_recall_latency_seconds_bucket"} <= used  # fmt: skip
    assert all('job="twotower-serving"' in e for e in exprs)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) and dash["uid"] and dash["schemaVersion"] >= 30
    prom = yaml.safe_load((PROJECT_ROOT / "infra" / "prometheus.yml").read_text())
    job = prom["scrape_configs"][0]
    assert job["job_name"] == "twotower-serving" and job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == [f"{ServingConfig().host}:{ServingConfig().port}"]

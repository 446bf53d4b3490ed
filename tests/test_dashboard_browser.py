"""The ops dashboard in a real headless Chromium: the page's JavaScript fetches /freshness and
/freshness/history from a real server, and what it shows must be what /freshness says.

State: a version published by the real nightly pipeline (tests.serving_fixtures), and the
incremental consumer's state written with streaming.state.StreamState's writers (the calls the
consumer makes). Screenshots go to the test's tmp dir and to state/screenshots/ for humans.
"""

from __future__ import annotations

import shutil
import time

import httpx
import pytest

from serving import freshness as fr
from serving.app import create_app
from tests.serving_fixtures import (
    ServerThread,
    clone_deployment,
    delete_prefix,
    dump_dom,
    elements_by_id,
    scenario,
    screenshot,
    shared_deployment,
    write_archive_state,
    write_incremental_state,
)
from twotower.config import PROJECT_ROOT

pytestmark = [pytest.mark.spark, pytest.mark.redis, pytest.mark.slow]

SCREENSHOTS = PROJECT_ROOT / "state" / "screenshots"
AGE_SLACK_S = 60  # the page and the test read /freshness a few seconds apart; ages move meanwhile


@pytest.fixture(scope="module")
def rclient():
    from jobs.redis_conn import redis_client
    from twotower.config import load_settings

    client = redis_client(load_settings())
    yield client
    client.close()


@pytest.fixture
def deployment(spark, ml_small_raw_dir, tmp_path_factory, rclient):
    base = shared_deployment(ml_small_raw_dir, tmp_path_factory.mktemp("serving_shared"))
    dep = clone_deployment(base, rclient)
    yield dep
    delete_prefix(rclient, dep.settings.redis.prefix)


def seed_samples(rclient, prefix: str, cfg, now_ms: int, hours: int = 12) -> None:
    """Freshness samples of the last ``hours`` hours, as an earlier server process recorded them."""
    for h in range(hours, 0, -1):
        t = now_ms - h * 3_600_000
        sample = {"now_ms": t, "incremental_age_s": 600.0 + 300 * (h % 3), "model_age_s": 3600.0 * (20 - h),
                  "watermark_lag_s": 1800.0 + 120 * h}  # fmt: skip
        fr.record_sample(rclient, prefix, sample, cfg, force=True)


def num(el) -> float:
    return float(el.value)


def check_page_matches_freshness(dom: dict, f: dict, hist: dict) -> None:
    assert dom["current-version"].value == f["version"]
    assert dom["current-version"].text.strip() == f["version"]
    assert dom["serving-version"].value == f["serving_version"] == f["version"]
    assert dom["serving-version"].text.strip() == "same"
    assert int(dom["model-trained-at"].value) == f["model_trained_at_ms"]
    assert int(dom["model-published-at"].value) == f["published_at_ms"]
    assert num(dom["model-age"]) == pytest.approx(f["model_age_s"], abs=AGE_SLACK_S)
    assert int(dom["last-incremental"].value) == f["last_incremental_publish_ms"]
    assert num(dom["incremental-age"]) == pytest.approx(f["incremental_age_s"], abs=AGE_SLACK_S)
    assert int(dom["watermark"].value) == f["watermark_ms"]
    assert num(dom["watermark-lag"]) == pytest.approx(f["watermark_lag_s"], abs=AGE_SLACK_S)
    assert int(dom["dead-letters"].value) == f["dead_letters"]
    assert dom["dead-letters"].text.strip() == f"{f['dead_letters']:,}"
    assert num(dom["archive-age"]) == pytest.approx(f["archive_age_s"], abs=AGE_SLACK_S)
    assert int(dom["raw-newest-event"].value) == f["raw_newest_event_ms"]
    assert ("stale" in dom["archive-age"].classes) is f["archive_stale"]
    assert int(dom["consumer-lag-total"].value) == f["consumer_lag_total"]
    for partition, lag in f["consumer_lag"].items():
        assert dom[f"consumer-lag-p{partition}"].text.strip() == f"{lag:,}"
    assert int(dom["index-n-items"].value) == f["index_n_items"]
    assert dom["index-n-items"].text.strip() == f"{f['index_n_items']:,}"
    assert float(dom["ann-recall"].value) == f["ann_recall_at_100"]
    assert dom["ann-recall"].text.strip() == f"{f['ann_recall_at_100']:.4f}"
    retrain = f["last_full_retrain"]
    assert dom["retrain-status"].value == retrain["status"] == "published"
    assert dom["retrain-gate"].value == "true" and dom["retrain-gate"].text.strip() == "passed"
    assert dom["retrain-date"].value == retrain["logical_date"]
    assert float(dom["retrain-duration"].value) == retrain["duration_s"]
    assert dom["metric-hit-50"].text.strip() == f"{retrain['metrics']['hit@50']:.4f}"
    chart = dom["chart-hourly"]
    assert int(chart.attrs["data-points"]) == len(hist["hours"]) == 48
    assert int(chart.attrs["data-events-total"]) == sum(hist["events_applied"])
    assert int(chart.attrs["data-users-total"]) == sum(hist["users_updated"])


def test_dashboard_shows_what_freshness_says_and_flags_stale_states(deployment, rclient, tmp_path):
    settings = deployment.settings
    prefix = settings.redis.prefix
    now_ms = int(time.time() * 1000)
    sc = scenario(deployment.version, now_ms, publish_age_s=600)
    write_incremental_state(rclient, prefix, sc)
    write_archive_state(rclient, prefix, now_ms - 600_000, sc.watermark_ms)
    seed_samples(rclient, prefix, settings.serving, now_ms)

    # --- fresh: everything within thresholds ------------------------------------------------------
    with ServerThread(create_app(settings)) as srv:
        html = dump_dom(srv.url + "/", tmp_path / "profile-fresh")
        body = httpx.get(srv.url + "/freshness", timeout=30).json()
        hist = httpx.get(srv.url + "/freshness/history", timeout=30).json()
        shot = screenshot(srv.url + "/", tmp_path / "dashboard.png", tmp_path / "profile-shot")
    dom = elements_by_id(html)
    f = body["freshness"]
    assert dom["top"].attrs["data-ready"] == "1", dom["banner"].text
    assert f["dead_letters"] == sum(sc.dead.values()) and f["consumer_lag_total"] == sum(sc.lag.values())
    assert hist["events_applied"] == sc.events and hist["users_updated"] == sc.users
    assert f["incremental_stale"] is False and f["model_stale"] is False and f["archive_stale"] is False
    check_page_matches_freshness(dom, f, hist)
    assert dom["banner"].value == "ok" and "stale" not in dom["banner"].classes
    assert "stale" not in dom["card-incremental"].classes and "stale" not in dom["card-model"].classes
    assert int(dom["chart-incremental-age"].attrs["data-points"]) >= 12  # seeded samples + the server's own
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, SCREENSHOTS / "dashboard.png")

    # --- stale: the hourly path stopped 3 h ago, and the model passed its (shortened) age limit ---
    stale_sc = scenario(deployment.version, now_ms, publish_age_s=3 * 3600)
    write_incremental_state(rclient, prefix, stale_sc)
    write_archive_state(rclient, prefix, now_ms - 3 * 3600_000, stale_sc.watermark_ms)
    stale_settings = settings.replace("serving", model_stale_s=1)
    time.sleep(1.5)  # the model is now older than 1 s
    with ServerThread(create_app(stale_settings)) as srv:
        html = dump_dom(srv.url + "/", tmp_path / "profile-stale")
        body = httpx.get(srv.url + "/freshness", timeout=30).json()
        hist = httpx.get(srv.url + "/freshness/history", timeout=30).json()
        shot = screenshot(srv.url + "/", tmp_path / "dashboard-stale.png", tmp_path / "profile-shot-stale")
    dom = elements_by_id(html)
    f = body["freshness"]
    assert f["incremental_stale"] is True and f["model_stale"] is True and f["archive_stale"] is True
    check_page_matches_freshness(dom, f, hist)
    assert "the archiver last landed the stream as raw Parquet 3.0 h ago" in dom["banner"].text
    assert dom["banner"].value == "stale" and "stale" in dom["banner"].classes
    assert "STALE" in dom["banner"].text
    for card, note, flagged in [("card-incremental", "incremental-stale-note", "incremental-age"), ("card-model", "model-stale-note", "model-age")]:
        assert "stale" in dom[card].classes
        assert dom[note].text.startswith("STALE")
        assert "stale" in dom[flagged].classes
    assert "no incremental publish for 2 h 0 min or more" in dom["incremental-stale-note"].text
    shutil.copyfile(shot, SCREENSHOTS / "dashboard-stale.png")


def test_dashboard_with_nothing_published_says_so(settings, redis_client, tmp_path):
    """A fresh deployment: the page renders, names the problem, and shows no invented numbers."""
    with ServerThread(create_app(settings)) as srv:
        dom = elements_by_id(dump_dom(srv.url + "/", tmp_path / "profile"))
    assert dom["top"].attrs["data-ready"] == "1"
    assert dom["current-version"].text.strip() == "none published" and dom["current-version"].value == ""
    assert dom["banner"].value == "stale" and "no model version is published" in dom["banner"].text
    assert dom["index-n-items"].value == "" and dom["dead-letters"].value == ""
    assert dom["last-incremental"].text.strip() == "never"
    assert dom["archive-age"].text.strip() == "never" and dom["archive-age"].value == ""

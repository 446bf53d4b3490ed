"""The "throughput and limits" benchmarks at tiny sizes against the real Spark, Redis and broker:
each run() completes, its JSON has the common fields and sane numbers, its render() gives a
table, and it leaves no Redis keys behind. Speed is never asserted (benchmarks report)."""

from __future__ import annotations

import json

import pytest

from benchmarks import consumer_memory, freshness, index_scale, redis_rate, spark_prepare
from benchmarks.limits_common import write_result
from tests.kafka_fixtures import kafka_broker, kafka_settings  # noqa: F401  (fixtures)
from twotower.config import Settings

COMMON = {"benchmark", "command", "measured_at", "machine"}


def leftover_keys(client, pattern: str = "tt-bench-*") -> list[bytes]:
    return list(client.scan_iter(match=pattern, count=1000))


def check_common(result: dict, name: str, tmp_path) -> list[str]:
    assert COMMON <= result.keys() and result["benchmark"] == name
    assert result["command"].startswith(f"python -m benchmarks.{name}")
    path = write_result(result, tmp_path / f"{name}.json")
    assert json.loads(path.read_text())["benchmark"] == name  # JSON-serialisable as written
    lines = getattr(__import__(f"benchmarks.{name}", fromlist=["render"]), "render")(result)
    assert any(line.startswith("|---") for line in lines)  # a markdown table
    return lines


def test_spark_prepare_tiny(settings: Settings, spark, tmp_path):
    result = spark_prepare.run(n_events=5000, n_users=200, n_items=100, days=3, settings=settings, argv=["--events", "5000"])
    check_common(result, "spark_prepare", tmp_path)
    p = result["prepare"]
    assert p["events_in"] == 5000 and p["events_after_dedup"] == 5000
    assert p["rows_out"]["n_train"] + p["rows_out"]["n_eval"] == 5000
    assert 0 < p["rows_out"]["n_users"] <= 200 and 0 < p["rows_out"]["n_items"] <= 100
    assert p["seconds"] > 0 and p["events_per_s"] > 0 and result["generation"]["seconds"] > 0
    again = spark_prepare.run(n_events=5000, n_users=200, n_items=100, days=3, settings=settings, argv=[])
    assert again["generation"]["reused"] is True  # the raw data of the same spec is generated once
    assert again["prepare"]["rows_out"] == p["rows_out"]


def test_redis_rate_tiny(settings: Settings, redis_client, tmp_path):
    result = redis_rate.run(n_users=2000, batch=500, events_per_user=2, settings=settings, argv=[])
    check_common(result, "redis_rate", tmp_path)
    for path in ("plain_pipelined", "apply_users_lua"):
        r = result[path]
        assert r["rows_per_s"] > 0 and r["events_per_s"] == pytest.approx(2 * r["rows_per_s"], rel=0.01)
    assert result["row_bytes"] == 4 * settings.model.id_dim
    assert not leftover_keys(redis_client, "tt-bench-redis_rate-*")


def test_index_scale_tiny_and_reused_by_serving(settings: Settings, tmp_path):
    result = index_scale.run(n_items=10_000, d=16, n_queries=100, n_single=20, gpu_items=100_000, settings=settings, argv=[])
    check_common(result, "index_scale", tmp_path)
    c = result["cpu"]
    assert c["factory"].startswith("IVF") and 0.0 <= c["recall_at_k"] <= 1.0 and c["recall_at_k"] > 0.5
    assert c["build_seconds"] > 0 and c["batch"]["qps"] > 0 and c["single"]["qps"] > 0
    assert c["train_vectors"] <= 10_000
    assert result["gpu"]["measured"] or "no GPU" in result["gpu"]["reason"]
    root, meta, built_now = index_scale.ensure_index(10_000, 16, settings.index)  # what serving_latency calls
    assert not built_now and meta["factory"] == c["factory"] and (root / "index.faiss").exists()


def test_freshness_tiny(kafka_settings: Settings, redis_client, tmp_path):
    result = freshness.run(rates=(40,), hours=1, hour_s=2.0, n_users=50, n_items=40, settings=kafka_settings, argv=[])
    lines = check_common(result, "freshness", tmp_path)
    (r,) = result["rates"]
    assert r["events_measured"] > 0 and r["not_visible_within_drain"] == 0
    a = r["apply_latency_ms"]
    assert a["n"] == r["events_measured"] and 0 <= a["p50"] <= a["p99"]
    assert r["produce_to_visible_compressed_ms"]["p50"] >= a["p50"]  # the window wait comes on top
    assert r["consumer_hour_timings"]["hours"] >= 1
    assert any("between 10 and 70 minutes" in line for line in lines)
    assert not leftover_keys(redis_client, f"tt-bench-{result['benchmark']}-*")


def test_consumer_memory_tiny(kafka_settings: Settings, redis_client, tmp_path):
    result = consumer_memory.run(n_users=5000, n_items=300, n_events=400, hours=2, settings=kafka_settings, argv=[])
    check_common(result, "consumer_memory", tmp_path)
    c = result["consumer"]
    assert c["hours_applied"] == 2 and c["events_applied"] == 400
    assert c["peak_rss_bytes"] >= c["sampled_peak_rss_bytes"] > 50 * 2**20
    assert c["peak_rss_bytes"] > result["imports_only_peak_rss_bytes"] * 0.9
    assert not leftover_keys(redis_client, f"tt-bench-{result['benchmark']}-*")

"""Quality gate: the pure decision, and check_gate against the serving version in real Redis."""

from __future__ import annotations

import json

import pytest

from jobs.gate import GateResult, check_gate, gate_decision
from twotower import redis_keys
from twotower.config import GateConfig, Settings

CFG = GateConfig(metric="hit@50", max_regression=0.05, min_value=0.1)


def m(value: float) -> dict:
    return {"exact": {"hit@50": value, "hit@10": 0.01}, "ann": {"hit@50": 0.0}}


def test_first_version_passes():
    r = gate_decision(m(0.30), None, CFG)
    assert r == GateResult(True, r.reason, "hit@50", 0.30, None, None)
    assert "no version is serving" in r.reason


def test_small_drop_passes_large_drop_fails():
    ok = gate_decision(m(0.386), m(0.40), CFG, "v-old")  # 3.5% drop
    assert ok.passed and ok.current_value == 0.40 and ok.current_version == "v-old"
    bad = gate_decision(m(0.37), m(0.40), CFG, "v-old")  # 7.5% drop
    assert not bad.passed
    assert bad.reason == (
        "hit@50 fell from 0.4000 (serving v-old) to 0.3700: a 7.5% drop exceeds the allowed 5.0%"
    )
    assert gate_decision(m(0.5), m(0.40), CFG, "v-old").passed  # gains always pass


def test_boundary_is_inclusive():
    assert gate_decision(m(0.38), m(0.40), CFG, "v").passed  # exactly 5%
    assert not gate_decision(m(0.3799), m(0.40), CFG, "v").passed


def test_absolute_floor_and_missing_metric():
    low = gate_decision(m(0.05), None, CFG)
    assert not low.passed and "below the absolute floor 0.1000" in low.reason
    missing = gate_decision({"exact": {"hit@10": 0.2}}, m(0.4), CFG, "v")
    assert not missing.passed and missing.new_value is None and "evaluate" in missing.reason
    nan = gate_decision({"exact": {"hit@50": float("nan")}}, None, CFG)
    assert not nan.passed


def test_serving_version_without_metrics_passes():
    r = gate_decision(m(0.2), {}, CFG, "v-old")
    assert r.passed and "no recorded hit@50" in r.reason


def test_check_gate_reads_the_serving_version_from_redis(settings: Settings, redis_client, tmp_path):
    s = settings.replace("gate", min_value=0.0)
    p = s.redis.prefix
    art = tmp_path / "20240131-aaaaaaaa"
    art.mkdir()
    (art / "metrics.json").write_text(json.dumps(m(0.30)))

    first = check_gate(s, art, client=redis_client)
    assert first.passed and first.current_version is None

    redis_client.hset(redis_keys.pointer(p), mapping={"current": "20240130-bbbbbbbb"})
    redis_client.set(redis_keys.version_meta(p, "20240130-bbbbbbbb"), json.dumps({"metrics": m(0.40)}))
    second = check_gate(s, art, client=redis_client)
    assert not second.passed
    assert (second.current_version, second.current_value, second.new_value) == ("20240130-bbbbbbbb", 0.40, 0.30)
    assert "25.0% drop" in second.reason


@pytest.mark.parametrize("metric", ["hit@10", "ndcg@10"])
def test_gate_metric_is_configurable(metric):
    cfg = GateConfig(metric=metric, max_regression=0.1, min_value=0.0)
    new = {"exact": {metric: 0.08}}
    cur = {"exact": {metric: 0.10}}
    r = gate_decision(new, cur, cfg, "v")
    assert not r.passed and r.metric == metric

"""Quality gate: a new version publishes only if its offline metric holds up against the version
serving now (DESIGN §2). The decision is a pure function; ``check_gate`` adds the I/O.

The compared metric is an exact-search metric (``GateConfig.metric``, default hit@50) from the
``exact`` section of metrics.json; the serving version's value comes from its Redis metadata,
which publish wrote from that version's metrics.json.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twotower import redis_keys
from twotower.config import GateConfig, Settings
from twotower.contracts import ARTIFACT_FILES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GateResult:
    """Outcome of the gate. ``current_value``/``current_version`` are None when nothing serves."""

    passed: bool
    reason: str
    metric: str
    new_value: float | None
    current_value: float | None = None
    current_version: str | None = None


def exact_metric(metrics: dict[str, Any] | None, name: str) -> float | None:
    """``name`` from metrics.json's ``exact`` section (or a flat dict); None when absent or not finite."""
    if not metrics:
        return None
    section = metrics.get("exact", metrics)
    value = section.get(name) if isinstance(section, dict) else None
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def gate_decision(
    new_metrics: dict[str, Any], current_metrics: dict[str, Any] | None, cfg: GateConfig, current_version: str | None = None
) -> GateResult:
    """Pass/fail of a new version's metrics against the serving version's (None: nothing serves).

    Fails when the metric is missing, below ``cfg.min_value``, or lower than the serving value
    by more than ``cfg.max_regression`` relative. Pure.
    """
    new = exact_metric(new_metrics, cfg.metric)
    current = exact_metric(current_metrics, cfg.metric)

    def result(passed: bool, reason: str) -> GateResult:
        return GateResult(passed, reason, cfg.metric, new, current, current_version)

    if new is None:
        return result(False, f"the new version has no exact {cfg.metric} in its metrics; run the evaluate stage first")
    if new < cfg.min_value:
        return result(False, f"{cfg.metric} {new:.4f} is below the absolute floor {cfg.min_value:.4f}")
    if current_version is None and current_metrics is None:
        return result(True, f"no version is serving yet; {cfg.metric} {new:.4f} clears the floor {cfg.min_value:.4f}")
    if current is None:
        return result(True, f"serving version {current_version} has no recorded {cfg.metric}; nothing to compare, passing")
    if current <= 0:
        return result(True, f"{cfg.metric} {new:.4f} vs serving {current:.4f} (serving value is 0: no regression possible)")
    drop = (current - new) / current
    if drop > cfg.max_regression + 1e-12:  # tolerance: 0.40 -> 0.38 is exactly 5%, not 5.000000000000002%
        return result(
            False,
            f"{cfg.metric} fell from {current:.4f} (serving {current_version}) to {new:.4f}: "
            f"a {drop:.1%} drop exceeds the allowed {cfg.max_regression:.1%}",
        )
    change = "drop" if drop > 0 else "gain"
    return result(
        True,
        f"{cfg.metric} {new:.4f} vs {current:.4f} serving ({current_version}): {abs(drop):.1%} {change}, "
        f"within the allowed {cfg.max_regression:.1%} drop",
    )


def serving_version(client, prefix: str) -> tuple[str | None, dict[str, Any] | None]:
    """(current version, its metadata) from Redis; (None, None) when nothing is published."""
    current = client.hget(redis_keys.pointer(prefix), "current")
    if not current:
        return None, None
    version = current.decode()
    raw = client.get(redis_keys.version_meta(prefix, version))
    return version, (json.loads(raw) if raw else None)


def check_gate(settings: Settings, artifact_dir: Path, client=None) -> GateResult:
    """Gate the version in ``artifact_dir`` against the serving version in Redis."""
    from jobs.redis_conn import redis_client

    path = Path(artifact_dir) / ARTIFACT_FILES["metrics"]
    new_metrics = json.loads(path.read_text()) if path.exists() else {}
    own = client is None
    client = client or redis_client(settings)
    try:
        version, meta = serving_version(client, settings.redis.prefix)
    finally:
        if own:
            client.close()
    result = gate_decision(new_metrics, (meta or {}).get("metrics") if version else None, settings.gate, version)
    verdict = "passed" if result.passed else "FAILED"
    (log.info if result.passed else log.warning)("quality gate for %s: %s: %s", Path(artifact_dir).name, verdict, result.reason)
    return result

"""The main job behind ``make run`` and the quality report behind ``make quality``.

``run_main``: pick the input (DATA=file, else MovieLens-100K when present, else the seeded
synthetic generator, saying which), ingest it to raw Parquet, run the nightly retrain for the
logical date, then stream the days after the cutoff through Kafka and apply the hourly updates
when the streaming path is available.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path
from typing import Any

from twotower.config import Settings
from twotower.contracts import parse_day

log = logging.getLogger(__name__)


def ingest_input(settings: Settings, data: str | None) -> tuple[str, list[str]]:
    """Ingest the chosen input into ``settings.paths.raw_dir``; returns (source name, days)."""
    from jobs.ingest import ingest_file, ingest_movielens, ingest_synthetic
    from jobs.synthetic import SyntheticSpec

    raw = settings.paths.raw_dir
    data = data or settings.run.data
    if data:
        path = Path(data).expanduser().resolve()
        log.info("input: interactions file %s", path)
        return str(path), ingest_file(path, raw).days
    ml = settings.paths.movielens_dir
    if (ml / "u.data").exists():
        log.info("input: MovieLens-100K from %s (GroupLens, University of Minnesota)", ml)
        return "movielens-100k", ingest_movielens(ml, raw).days
    spec = SyntheticSpec(
        n_users=settings.run.synthetic_users, n_items=settings.run.synthetic_items, n_events=settings.run.synthetic_events
    )
    log.warning(
        "input: MovieLens-100K not found at %s and no DATA= given, so using the seeded synthetic "
        "generator (%d users, %d items, %d events)",
        ml,
        spec.n_users,
        spec.n_items,
        spec.n_events,
    )
    return "synthetic", ingest_synthetic(raw, spec).days


def default_logical_date(days: list[str], replay_days: int) -> dt.date:
    """Last day of the data minus the days kept back for the streaming path. Pure."""
    if not days:
        raise ValueError("the input produced no day partitions")
    return parse_day(max(days)) - dt.timedelta(days=replay_days)


def run_main(settings: Settings, data: str | None = None, day: dt.date | None = None) -> dict[str, Any]:
    """Ingest -> nightly retrain and publish -> (incremental replay when available)."""
    from jobs.nightly import run_nightly

    source, days = ingest_input(settings, data)
    day = day or default_logical_date(days, settings.run.replay_days)
    log.info("nightly retrain for logical date %s on %s", day, source)
    result = run_nightly(settings, day)
    summary: dict[str, Any] = {"source": source, "nightly": result.as_dict()}
    exact = result.metrics.get("exact", {})
    log.info(
        "version %s: %s; exact hit@10 %.3f hit@50 %.3f ndcg@10 %.3f",
        result.version,
        result.status,
        exact.get("hit@10", float("nan")),
        exact.get("hit@50", float("nan")),
        exact.get("ndcg@10", float("nan")),
    )
    return summary


QUALITY_ROWS = ("hit@10", "hit@50", "hit@100", "ndcg@10")


def format_quality_table(metrics: dict[str, Any]) -> str:
    """Markdown table of model (exact, ANN) and baselines. Pure."""
    rows = [("two-tower (exact)", metrics.get("exact", {})), ("two-tower (IVF index)", metrics.get("ann", {}))]
    rows += [(name, m) for name, m in sorted(metrics.get("baselines", {}).items())]
    lines = ["| model | " + " | ".join(QUALITY_ROWS) + " |", "|---" * (len(QUALITY_ROWS) + 1) + "|"]
    for name, m in rows:
        lines.append(f"| {name} | " + " | ".join(f"{m.get(k, float('nan')):.3f}" for k in QUALITY_ROWS) + " |")
    return "\n".join(lines)


def run_quality(settings: Settings) -> dict[str, Any]:
    """DESIGN §9 protocol on all of MovieLens-100K, in a separate state dir and Redis prefix.

    Trains with the default config on everything up to the last day, holds out each user's last
    interaction, ranks the full corpus with seen items excluded, exact and through the index,
    beside the popularity baseline; prints a table and writes ``quality.json``. Publishes nothing.
    """
    from jobs.ingest import ingest_movielens
    from jobs.nightly import run_nightly

    ml = settings.paths.movielens_dir
    if not (ml / "u.data").exists():
        raise FileNotFoundError(f"make quality needs MovieLens-100K at {ml}")
    qdir = settings.paths.state_dir / "quality"
    settings = settings.replace("paths", state_dir=qdir).replace("redis", prefix=settings.redis.prefix + "-quality")
    days = ingest_movielens(ml, settings.paths.raw_dir).days
    day = default_logical_date(days, 0)
    result = run_nightly(settings, day, publish="no")
    table = format_quality_table(result.metrics)
    print(f"MovieLens-100K, D={day}, last interaction per user held out, full ranking, seen excluded")
    print(table)
    out = {"logical_date": day.isoformat(), "version": result.version, "metrics": result.metrics, "index": result.index}
    (qdir / "quality.json").write_text(json.dumps(out, indent=2, sort_keys=True, default=str))
    return out

"""The main job behind ``make run`` and the quality report behind ``make quality``.

``run_main``: pick the input (DATA=file, else MovieLens-100K when present, else the seeded
synthetic generator, saying which), ingest it to raw Parquet, run the nightly retrain for the
logical date, then stream the days after the cutoff through Kafka, apply the hourly updates and
land the stream as raw Parquet (the archiver, as the hourly DAG runs it).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
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
    if result.published and settings.run.replay_days > 0:
        summary["incremental"] = run_incremental_replay(settings, day)
    return summary


def run_incremental_replay(settings: Settings, day: dt.date) -> dict[str, Any]:
    """Stream the raw days after D's cutoff through Kafka, apply every closed hour, then land the
    topic as raw Parquet (the archiver; here every streamed event is already in raw, since the
    replay read it from there, so the landing shows the deduplication: nothing new is written).

    The replay is recorded in Redis so a second ``make run`` does not publish the same events
    again (the consumer would drop them as duplicates anyway, but the topic would grow).
    """
    from jobs.redis_conn import redis_client
    from streaming.archiver import run_archiver
    from streaming.consumer import run_bounded
    from streaming.replayer import replay
    from twotower import redis_keys
    from twotower.contracts import day_start_ms

    start_ms = day_start_ms(day + dt.timedelta(days=1))
    end_ms = day_start_ms(day + dt.timedelta(days=settings.run.replay_days + 1))
    marker = redis_keys.incremental(settings.redis.prefix, f"replayed:{settings.kafka.topic}:{start_ms}:{end_ms}")
    client = redis_client(settings)
    try:
        if client.set(marker, str(int(time.time() * 1000)), nx=True):
            report = replay(settings, start_ms, end_ms, speedup=settings.run.replay_speedup)
            replayed = report.events
        else:
            log.info("the %d days after the cutoff were already replayed into %s; consuming only", settings.run.replay_days, settings.kafka.topic)
            replayed = 0
    except BaseException:
        client.delete(marker)  # a failed replay must be retried by the next run
        raise
    finally:
        client.close()
    report = run_bounded(settings)
    log.info(
        "incremental: %s hours applied, %s events applied, %s dead letters",
        report.get("hours_applied"),
        report.get("events_applied"),
        report.get("dead_letters"),
    )
    landed = run_archiver(settings, "bounded")  # it logs what it landed and what was there already
    return {"replayed_events": replayed, "consumer": report, "archive": landed}


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

"""Does the incremental path pay? Next-hour hit@50 in a temporal replay (issue 6).

    python -m benchmarks.temporal_replay [--seeds 3] [--days 3] [--long-days 0] [--epochs 8]
        [--streams movielens,synthetic] [--sweep-steps 1,2,5 --sweep-lr 0.005,0.01 --sweep-min-events 1,3] [--keep]

For each stream the product's own nightly code trains a model up to a cutoff: jobs.nightly's
stage_prepare (Spark) and stage_train, the two stages of run_nightly that make the model
(evaluate, gate, index and publish do not change it and are skipped; ranking is exact, so no
index is needed). The hours after the cutoff are then replayed one by one, and every target
hour is scored as benchmarks.replay_sim defines it (queries = users active in the hour,
targets = their items of the hour not seen before, full-corpus ranking with seen items
excluded, hit@50), for:

  (a) the frozen nightly model, histories as of the cutoff;
  (b) the frozen nightly model, live histories (every event before the target hour);
  (c) (b) plus the hourly user-ID row updates, computed by the product's update code
      (streaming.hour.plan_users / compute_rows, streaming.update.update_blocks) with the
      IncrementalConfig of load_settings(), so TT_INCREMENTAL_* overrides are what is measured;
      the rows are kept in memory instead of Redis (see benchmarks.replay_sim);
  (d) a full retrain each day: prepare + train on everything up to the end of each replayed day,
      frozen within the next day, live histories. The first replayed day's model is the nightly
      model itself, so (d) = (b) on that day;
  (e) beyond the issue, what production runs: (d) plus the hourly updates on each day's model,
      starting from its cutoff with fresh rows (as the consumer does after a version switch);
  popularity: item counts before the cutoff, ranked the same way (a scale for the others);
  diagnostics b_oov / c_oov: (b) and (c) on a copy of the nightly model whose never-trained ID
      rows (users first active after the cutoff, already in the vocabulary through the
      attribute table) hold the trained out-of-vocabulary row 0 instead of their random init.

Windows: every variant over the first ``--days`` days (one retrain per day and seed for (d));
the variants that need no retrain also over ``--long-days`` (0 = to the end of the data), which
on MovieLens is the whole post-cutoff tail (47 days, ~85% of its events from new users, DESIGN
§9) and gives (c) vs (b) enough queries to mean something (the first 3 days hold ~50).

Streams:
  * movielens: MovieLens-100K, cutoff at the midnight nearest the 80% time quantile (DESIGN §9);
  * synthetic: jobs.synthetic with ``synthetic_spec()``: 60k events over 14 days, every user
    active after the cutoff has events before it (returning users), and every user's taste
    drifts once at a uniformly random time (drift_prob 1.0), so ~20% drift during the replay.

Seeds: the training seed (TrainConfig.seed + i); the data are the same for every seed.
``--sweep-*`` adds (c) rows with other update settings, scored on the same models and queries.
Results go to benchmarks/out/temporal_replay.json; ``render`` gives the RESULTS.md section.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import shutil
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from twotower.config import IncrementalConfig, Settings, load_settings

if TYPE_CHECKING:
    from benchmarks.replay_sim import EventLog
    from streaming.version import LoadedVersion

log = logging.getLogger("benchmarks.temporal_replay")
OUT = Path(__file__).resolve().parent / "out"
VARIANTS = ("a", "b", "c", "d", "e", "popularity", "b_oov", "c_oov")
VARIANT_NAMES = {
    "a": "(a) frozen nightly model, histories as of the cutoff",
    "b": "(b) frozen nightly model, live histories",
    "c": "(c) live histories + hourly user-ID row updates",
    "d": "(d) full retrain each day, live histories",
    "e": "(e) daily retrain + hourly row updates (production)",
    "popularity": "popularity at the cutoff (reference)",
    "b_oov": "diagnostic: (b) with never-trained ID rows replaced by the OOV row",
    "c_oov": "diagnostic: (c) with never-trained ID rows replaced by the OOV row",
}
QUANTILE = 0.8
DEFAULTS = {"seeds": 3, "days": 3, "long_days": 0, "epochs": 8}
"""Default run: 3 training seeds; 3 days with every variant (the nightly model plus 2 retrains
per seed and stream); (a)-(c) to the end of the data; 8 epochs instead of the product's 12 for
every model of the run (18 trainings in all), so the whole run fits ~12 minutes on 2 idle cores."""


def synthetic_spec():
    """The synthetic stream: returning users with drifting tastes (see the module docstring)."""
    from jobs.synthetic import SyntheticSpec

    return SyntheticSpec(n_users=2000, n_items=1000, n_events=60_000, days=14, drift_prob=1.0, seed=7)


@dataclass(frozen=True)
class StreamSource:
    """A named input: ``ingest(raw_dir)`` writes its raw day partitions and attribute tables."""

    name: str
    description: str
    ingest: Callable[[Path], Any]


def movielens_source(ml_dir: Path) -> StreamSource:
    from jobs.ingest import ingest_movielens

    return StreamSource("movielens", f"MovieLens-100K from {ml_dir}", lambda raw: ingest_movielens(ml_dir, raw))


def synthetic_source() -> StreamSource:
    from jobs.ingest import ingest_synthetic

    spec = synthetic_spec()
    text = ", ".join(f"{k}={v}" for k, v in asdict(spec).items())
    return StreamSource("synthetic", f"jobs.synthetic SyntheticSpec({text})", lambda raw: ingest_synthetic(raw, spec))


def read_raw_events(raw_dir: Path):
    """Every raw event partition (``dt=*/*.parquet``) as one Arrow table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(raw_dir.glob("dt=*/*.parquet"))
    if not files:
        raise FileNotFoundError(f"no raw event partitions under {raw_dir}")
    cols = ["event_id", "user_id", "item_id", "event_type", "ts", "weight"]
    return pa.concat_tables([pq.read_table(f, columns=cols) for f in files])


# --- one seed ----------------------------------------------------------------------------------


def replay_seed(
    versions: list[LoadedVersion], stream: EventLog, cutoff_ms: int, days: int, long_days: int, inc: dict[str, IncrementalConfig]
) -> dict[str, Any]:
    """Replay the hours after ``cutoff_ms`` with one seed's models and score every query.

    ``versions[k]``: the LoadedVersion trained up to ``cutoff_ms + k days`` (k = 0: the nightly
    model). (d) and (e) need a retrain per day, so they are scored over the first ``days``
    days only; every other variant over ``long_days`` (>= ``days``). ``inc``: incremental
    settings per (c) variant ("c" = the defaults, others from a sweep).

    Returns ``scores[variant] = (hit [Q], recall [Q])`` aligned with ``query_users`` and
    ``query_hours`` (NaN where a variant did not score the query), plus counts.
    """
    from benchmarks.replay_sim import DAY_MS, HOUR_MS, HourlyRows, next_hour_queries, popularity_counts, rank_model, rank_popularity, with_oov_rows

    nightly = versions[0]
    L = nightly.history_len
    pop = popularity_counts(stream.between(0, cutoff_ms), nightly.item_index)
    nightly_oov = with_oov_rows(nightly, stream.users_before(cutoff_ms))
    row_sims = {name: HourlyRows(nightly, cfg, stream) for name, cfg in inc.items()}
    row_sims["c_oov"] = HourlyRows(nightly_oov, inc["c"], stream)
    daily_rows = HourlyRows(nightly, inc["c"], stream)
    columns: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    query_users: list[str] = []
    query_hours: list[int] = []
    n_targets = unknown_targets = 0
    for hour in range(cutoff_ms, cutoff_ms + long_days * DAY_MS, HOUR_MS):
        day = (hour - cutoff_ms) // DAY_MS
        if day < days and (hour - cutoff_ms) % DAY_MS == 0:  # the day's retrain starts with fresh rows
            daily_rows = HourlyRows(versions[day], inc["c"], stream)
        queries = next_hour_queries(stream, hour)
        if queries:
            live = [stream.history(q.user_id, hour, L) for q in queries]
            frozen = [stream.history(q.user_id, cutoff_ms, L) for q in queries]
            results = {
                "a": rank_model(nightly, queries, {}, frozen),
                "b": rank_model(nightly, queries, {}, live),
                "b_oov": rank_model(nightly_oov, queries, {}, live),
                "popularity": rank_popularity(pop, nightly.item_index, queries),
            }
            if day < days:
                results["d"] = rank_model(versions[day], queries, {}, live)
                results["e"] = rank_model(versions[day], queries, daily_rows.rows(), live)
            for name, sim in row_sims.items():
                results[name] = rank_model(sim.version, queries, sim.rows(), live)
            for name, res in results.items():
                _append_aligned(columns.setdefault(name, []), len(query_users), res)
            query_users += [q.user_id for q in queries]
            query_hours += [hour] * len(queries)
            n_targets += sum(len(q.targets) for q in queries)
            unknown_targets += sum(1 for q in queries for i in q.targets if i not in nightly.item_index)
        for sim in row_sims.values():
            sim.apply_hour(hour)
        if day < days:
            daily_rows.apply_hour(hour)
    scores = {}
    for name, col in columns.items():
        _append_aligned(col, len(query_users), (np.zeros(0), np.zeros(0)))
        scores[name] = (np.concatenate([h for h, _ in col]), np.concatenate([r for _, r in col]))
    return {
        "scores": scores,
        "query_users": query_users,
        "query_hours": np.array(query_hours, dtype=np.int64),
        "targets": n_targets,
        "unknown_targets": unknown_targets,
        "rows_written": {name: sim.users_updated for name, sim in row_sims.items()},
        "oov_starts": {name: sim.new_users for name, sim in row_sims.items()},
    }


METRICS = ("hit@50", "recall@50", "hit@50_new_users", "hit@50_returning_users")


def _append_aligned(col: list[tuple[np.ndarray, np.ndarray]], n_before: int, res: tuple[np.ndarray, np.ndarray]) -> None:
    """Append one hour's (hit, recall) to a variant's column, first padding with NaN the
    queries of earlier hours the variant did not score, so columns stay aligned by query."""
    gap = n_before - sum(len(h) for h, _ in col)
    if gap > 0:
        col.append((np.full(gap, np.nan), np.full(gap, np.nan)))
    col.append(res)


def seed_metrics(replay: dict[str, Any], new_users: set[str], in_window: np.ndarray) -> dict[str, dict[str, float | None]]:
    """Per variant scored in the window: hit@50 and recall@50 over the window's queries, and
    hit@50 split by new vs returning users. ``in_window`` is a bool mask over the queries. Pure."""
    is_new = np.array([u in new_users for u in replay["query_users"]], dtype=bool)
    out = {}
    for name, (hit, recall) in replay["scores"].items():
        scored = in_window & ~np.isnan(hit)
        if scored.sum() < in_window.sum() or not in_window.any():
            continue  # the variant did not score this whole window
        out[name] = {
            "hit@50": _mean(hit[scored]),
            "recall@50": _mean(recall[scored]),
            "hit@50_new_users": _mean(hit[scored & is_new]),
            "hit@50_returning_users": _mean(hit[scored & ~is_new]),
        }
    return out


def _mean(x: np.ndarray) -> float | None:
    return float(np.mean(x)) if len(x) else None


def spread(values: list[float | None]) -> dict[str, float | None]:
    """mean, std (population), min and max of the non-None values. Pure."""
    v = np.array([x for x in values if x is not None], dtype=np.float64)
    if not len(v):
        return {"mean": None, "std": None, "min": None, "max": None}
    return {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()), "max": float(v.max())}


def window_summary(per_seed: list[dict[str, dict]], inc_names: list[str]) -> dict[str, Any]:
    """Across seeds: spread of every metric per variant, and (c) - (b) hit@50 per seed. Pure."""
    names = list(per_seed[0])
    if "b" not in names:  # no query in the window
        return {"summary": {}, "c_minus_b_hit@50": {}, "c_not_worse_than_b": None, "c_not_worse_than_b_every_seed": None}
    summary = {name: {key: spread([p[name][key] for p in per_seed]) for key in METRICS} for name in names}
    diffs = {name: [p[name]["hit@50"] - p["b"]["hit@50"] for p in per_seed] for name in [*inc_names, "c_oov"] if name in per_seed[0]}
    return {
        "summary": summary,
        "c_minus_b_hit@50": {name: {"per_seed": d, **spread(d)} for name, d in diffs.items()},
        "c_not_worse_than_b": bool(np.mean(diffs["c"]) >= 0),
        "c_not_worse_than_b_every_seed": bool(min(diffs["c"]) >= 0),
    }


# --- one stream --------------------------------------------------------------------------------


def train_day(settings: Settings, day: dt.date) -> Path:
    """The product's nightly model for logical date ``day`` (its prepared partition must exist)."""
    from jobs.nightly import stage_train

    return stage_train(settings, day)


def replay_stream(
    settings: Settings,
    source: StreamSource,
    seeds: list[int],
    days: int,
    long_days: int,
    inc: dict[str, IncrementalConfig],
) -> dict[str, Any]:
    """Ingest ``source`` into ``settings.paths.state_dir``, prepare each of the ``days`` model
    days once (Spark), then per seed train those models and replay. ``long_days`` = 0: to the
    end of the data. ``settings.train`` holds the epochs; each seed replaces ``train.seed``."""
    from benchmarks.replay_sim import DAY_MS, EventLog, cutoff_day
    from jobs.nightly import stage_prepare
    from streaming.version import load_version
    from twotower.contracts import day_start_ms

    t0 = time.perf_counter()
    source.ingest(settings.paths.raw_dir)
    stream = EventLog(read_raw_events(settings.paths.raw_dir))
    day0 = cutoff_day(stream.ts, QUANTILE)
    cutoff_ms = day_start_ms(day0 + dt.timedelta(days=1))
    last_day = -(-(int(stream.ts.max()) + 1 - cutoff_ms) // DAY_MS)
    long_days = max(days, min(long_days, last_day) if long_days > 0 else last_day)
    known = stream.users_before(cutoff_ms)
    model_days = [day0 + dt.timedelta(days=k) for k in range(days)]
    log.info(
        "%s: cutoff %s (%.1f%% of events before it); all variants over %d days, (a)-(c) over %d days",
        source.name, _iso(cutoff_ms), 100 * float(np.mean(stream.ts < cutoff_ms)), days, long_days,
    )  # fmt: skip
    t = time.perf_counter()
    for day in model_days:
        stage_prepare(settings, day)
    prepare_s = time.perf_counter() - t

    replays, per_seed = [], []
    train_s = replay_s = 0.0
    for seed in seeds:
        s = settings.replace("train", seed=seed)
        t = time.perf_counter()
        dirs = [train_day(s, day) for day in model_days]
        train_s += time.perf_counter() - t
        versions = [load_version(s, d.name, {"artifact_dir": str(d)}) for d in dirs]
        t = time.perf_counter()
        replays.append(replay_seed(versions, stream, cutoff_ms, days, long_days, inc))
        replay_s += time.perf_counter() - t
        per_seed.append({"seed": seed, "versions": [d.name for d in dirs], "rows_written": replays[-1]["rows_written"], "oov_starts": replays[-1]["oov_starts"]})
        new_in_vocab = len((set(versions[0].user_index) - known) & {e.user_id for e in stream.between(cutoff_ms, cutoff_ms + long_days * DAY_MS)})

    windows = {}
    for wname, wdays in (("retrain", days), ("long", long_days)):
        end_ms = cutoff_ms + wdays * DAY_MS
        events = stream.between(cutoff_ms, end_ms)
        new_users = {e.user_id for e in events} - known
        first = replays[0]
        mask = first["query_hours"] < end_ms
        metrics = [seed_metrics(r, new_users, r["query_hours"] < end_ms) for r in replays]
        for p, m in zip(per_seed, metrics):
            p.setdefault("metrics", {})[wname] = m
        windows[wname] = {
            "days": wdays,
            "hours": int(len(set(first["query_hours"][mask].tolist()))),
            "queries": int(mask.sum()),
            "queries_new_users": int(sum(1 for u, m in zip(first["query_users"], mask) if m and u in new_users)),
            "events": len(events),
            "new_users": len(new_users),
            "share_events_new_users": _share(sum(e.user_id in new_users for e in events), len(events)),
            **window_summary(metrics, list(inc)),
        }
        w = windows[wname]["summary"]
        log.info(
            "%s, %d days, %d queries: hit@50 %s", source.name, wdays, windows[wname]["queries"],
            ", ".join(f"{v} {_fmt(w[v]['hit@50']['mean'])}" for v in w) or "not measured",
        )  # fmt: skip
    return {
        "stream": source.name,
        "source": source.description,
        "cutoff": _iso(cutoff_ms),
        "logical_date": day0.isoformat(),
        "seeds": seeds,
        "epochs": settings.train.epochs,
        "events_before_cutoff": int(np.sum(stream.ts < cutoff_ms)),
        "new_users_in_vocabulary": new_in_vocab,
        "targets_unknown_to_nightly_model": {"targets": replays[0]["targets"], "unknown": replays[0]["unknown_targets"]},
        "incremental": {name: _inc_dict(cfg) for name, cfg in inc.items()},
        "windows": windows,
        "per_seed": per_seed,
        "seconds": {"total": round(time.perf_counter() - t0, 1), "prepare": round(prepare_s, 1), "train": round(train_s, 1), "replay": round(replay_s, 1)},
    }


def _inc_dict(cfg: IncrementalConfig) -> dict[str, Any]:
    return {"steps": cfg.steps, "lr": cfg.lr, "min_events_new_user": cfg.min_events_new_user}


def _share(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


def _iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.timezone.utc).strftime("%Y-%m-%dT%H:%MZ")


def sweep_configs(base: IncrementalConfig, steps: list[int], lrs: list[float], min_events: list[int]) -> dict[str, IncrementalConfig]:
    """"c" = ``base`` plus one named config per point of the grid (missing axes keep base). Pure."""
    import dataclasses

    out = {"c": base}
    for st in steps or [base.steps]:
        for lr in lrs or [base.lr]:
            for me in min_events or [base.min_events_new_user]:
                cfg = dataclasses.replace(base, steps=st, lr=lr, min_events_new_user=me)
                if cfg != base:
                    out[f"c[steps={st},lr={lr:g},min_events={me}]"] = cfg
    return out


# --- the benchmark -----------------------------------------------------------------------------


def run(
    seeds: int = DEFAULTS["seeds"],
    days: int = DEFAULTS["days"],
    long_days: int = DEFAULTS["long_days"],
    epochs: int | None = DEFAULTS["epochs"],
    streams: tuple[str, ...] = ("movielens", "synthetic"),
    sweep: tuple[list[int], list[float], list[int]] = ([], [], []),
    keep: bool = False,
    sources: dict[str, StreamSource] | None = None,
) -> dict[str, Any]:
    """Replay every stream with ``seeds`` training seeds; ``epochs`` None = the configured epochs.
    ``sources`` overrides the inputs by stream name (tests pass a derived slice)."""
    import torch

    from benchmarks.stream_throughput import machine

    base = load_settings()
    tag = uuid.uuid4().hex[:8]
    if epochs is not None:
        base = base.replace("train", epochs=epochs)
    inc = sweep_configs(base.incremental, *sweep)
    seed_list = [base.train.seed + i for i in range(seeds)]
    sources = dict(sources or {})
    results: dict[str, Any] = {}
    torch.set_num_threads(base.incremental.threads)  # the update's thread count (training sets its own)
    t0 = time.perf_counter()
    for name in streams:
        if name not in sources:
            sources[name] = movielens_source(base.paths.movielens_dir) if name == "movielens" else synthetic_source()
        state = OUT / f"replay-{tag}-{name}"
        settings = base.replace("paths", state_dir=state)
        try:
            results[name] = replay_stream(settings, sources[name], seed_list, days, long_days, inc)
        finally:
            if not keep:
                shutil.rmtree(state, ignore_errors=True)
    return {
        "benchmark": "temporal_replay",
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.temporal_replay", *sys.argv[1:]]),
        "measured_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "seconds": round(time.perf_counter() - t0, 1),
        "train_epochs": base.train.epochs,
        "product_default_epochs": load_settings().train.epochs,
        "incremental_defaults": _inc_dict(base.incremental),
        "streams": results,
        "bar_c_not_worse_than_b": all(w["c_not_worse_than_b"] is not False for r in results.values() for w in r["windows"].values()),
    }


# --- report ------------------------------------------------------------------------------------


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _fmt_spread(s: dict[str, float | None] | None) -> str:
    if s is None or s["mean"] is None:
        return "n/a"
    return f"{s['mean']:.3f} ({s['min']:.3f}–{s['max']:.3f})"


def _verdict(w: dict[str, Any]) -> str:
    if w["c_not_worse_than_b"] is None:
        return "not measured: no query in the window"
    d = w["c_minus_b_hit@50"]["c"]
    ok = "yes" if w["c_not_worse_than_b"] else "**no**"
    return f"{ok}, mean difference {d['mean']:+.4f} (per seed " + ", ".join(f"{x:+.4f}" for x in d["per_seed"]) + ")"


def _days(n: int) -> str:
    return f"{n} day" + ("" if n == 1 else "s")


def _machine(m: dict[str, Any]) -> str:
    return f"{m.get('platform', '?')}, Python {m.get('python', '?')}, {m.get('cpus', '?')} CPUs"


def _window_lines(w: dict[str, Any]) -> list[str]:
    """The table of one window: a row per variant scored over it."""
    lines = [
        f"{_days(w['days'])} after the cutoff: {w['hours']} hours with queries, {w['queries']:,} queries "
        f"({w['queries_new_users']:,} from new users), {w['events']:,} events, "
        f"{100 * w['share_events_new_users']:.0f}% of them from users with no event before the cutoff.",
        "",
        "| variant | hit@50 mean (min–max) | recall@50 | hit@50, new users | hit@50, returning users |",
        "|---|---|---|---|---|",
    ]
    for v in VARIANTS:
        s = w["summary"].get(v)
        if s is None:
            why = "needs a retrain per replayed day; measured over the first days only" if v in ("d", "e") else "no query in the window"
            lines.append(f"| {VARIANT_NAMES[v]} | not measured: {why} | | | |")
            continue
        lines.append(
            f"| {VARIANT_NAMES[v]} | {_fmt_spread(s['hit@50'])} | {_fmt(s['recall@50']['mean'])} | "
            f"{_fmt(s['hit@50_new_users']['mean'])} | {_fmt(s['hit@50_returning_users']['mean'])} |"
        )
    return lines + ["", f"(c) >= (b) over {_days(w['days'])}: {_verdict(w)}.", ""]


def render(result: dict[str, Any]) -> list[str]:
    """Markdown lines of the RESULTS.md section: per stream a table per window, then the
    comparison of update settings (always the OOV diagnostic, plus a sweep when one ran). Pure."""
    inc = result["incremental_defaults"]
    lines = [
        "## Does the incremental path pay? Temporal replay, next-hour hit@50",
        "",
        f"Command: `{result['command']}`. Measured {result['measured_at']} on {_machine(result['machine'])}, {result['seconds']:.0f} s wall.",
        "",
        f"- Models: the product's Spark prepare + trainer (jobs.nightly stage_prepare, stage_train), {result['train_epochs']} epochs "
        f"(product default {result['product_default_epochs']}), one set per training seed; exact ranking (no index).",
        f"- Hourly updates: the product's plan_users / compute_rows / update_blocks with steps={inc['steps']}, lr={inc['lr']:g}, "
        f"min_events_new_user={inc['min_events_new_user']} (load_settings()); rows kept in memory instead of Redis.",
        "- Query: a user active in hour h+1; targets: the items of their h+1 events they had not interacted with before; "
        "the whole corpus ranked with every item seen before h+1 excluded; hit@50 = at least one target in the top 50. "
        "Mean over the window's queries; spread = min–max over seeds. New users: no event before the cutoff.",
        "",
    ]
    for name, r in result["streams"].items():
        short, long_ = r["windows"]["retrain"], r["windows"]["long"]
        lines += [f"### {name}", "", f"{r['source']}. Cutoff {r['cutoff']} (nightly logical date {r['logical_date']}), seeds {', '.join(map(str, r['seeds']))}.", ""]
        if r["new_users_in_vocabulary"]:
            lines += [
                f"{r['new_users_in_vocabulary']:,} users first active after the cutoff are already in the nightly vocabulary "
                "(prepare adds every user of the attribute table), so serving and the hourly update start them from a "
                "never-trained ID row, not the OOV row; min_events_new_user never applies to them.",
                "",
            ]
        lines += _window_lines(short)
        if long_["days"] > short["days"]:
            lines += _window_lines(long_)
        others = [k for k in long_["c_minus_b_hit@50"] if k != "c"]
        if others:
            lines += [
                f"(c) with other update settings, on the same models and queries ({_days(long_['days'])}):",
                "",
                "| setting | (c) hit@50 (min–max) | (c) − (b) mean | worst seed |",
                "|---|---|---|---|",
            ]
            for k in ["c", *others]:
                dd = long_["c_minus_b_hit@50"][k]
                label = {"c": "defaults", "c_oov": "defaults, never-trained rows replaced by the OOV row"}.get(k, k[2:-1])
                lines.append(f"| {label} | {_fmt_spread(long_['summary'][k]['hit@50'])} | {dd['mean']:+.4f} | {dd['min']:+.4f} |")
            lines.append("")
    return lines


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    from twotower.logs import setup_logging

    parser = argparse.ArgumentParser(prog="python -m benchmarks.temporal_replay", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=DEFAULTS["seeds"], help="training seeds per stream")
    parser.add_argument("--days", type=int, default=DEFAULTS["days"], help="days replayed with every variant (one retrain per day for (d))")
    parser.add_argument("--long-days", type=int, default=DEFAULTS["long_days"], help="days replayed for the variants without retrains (0 = to the end of the data)")
    parser.add_argument("--epochs", type=int, default=DEFAULTS["epochs"], help="training epochs of every model (0 = the configured TT_TRAIN_EPOCHS)")
    parser.add_argument("--streams", default="movielens,synthetic", help="comma-separated: movielens, synthetic")
    parser.add_argument("--sweep-steps", default="", help="comma-separated update steps to compare with the defaults")
    parser.add_argument("--sweep-lr", default="", help="comma-separated update learning rates")
    parser.add_argument("--sweep-min-events", default="", help="comma-separated min_events_new_user values")
    parser.add_argument("--keep", action="store_true", help="keep the scratch state dirs under benchmarks/out/")
    args = parser.parse_args(argv)
    streams = tuple(s.strip() for s in args.streams.split(",") if s.strip())
    bad = [s for s in streams if s not in ("movielens", "synthetic")]
    if bad or not streams or args.seeds < 1 or args.days < 1 or args.epochs < 0 or args.long_days < 0:
        parser.error(f"need streams in movielens,synthetic (got {bad or streams}), seeds >= 1, days >= 1, long-days >= 0, epochs >= 0")
    setup_logging()
    sweep = ([int(x) for x in _floats(args.sweep_steps)], _floats(args.sweep_lr), [int(x) for x in _floats(args.sweep_min_events)])
    result = run(args.seeds, args.days, args.long_days, args.epochs or None, streams, sweep, args.keep)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "temporal_replay.json").write_text(json.dumps(result, indent=2) + "\n")
    print("\n".join(render(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

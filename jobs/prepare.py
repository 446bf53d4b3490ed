"""Spark prepare job: raw events of a W-day window -> the prepared partition of logical date D.

    extract    raw/dt=... day partitions in (D - W, D] that exist (footers checked first),
               raw/users.parquet and raw/items.parquet, the previous partition's vocabularies
    transform  events: jobs.prepare_transform (pure DataFrame -> DataFrame, Spark): window,
               dedup, examples with temporal roll-back, train/eval split, user histories;
               per-id tables: jobs.prepare_vocab (pure, on the driver, from small aggregates):
               stable vocabularies, users/items attribute tables, item frequencies
    load       every table into a hidden sibling directory, manifest.json, _SUCCESS last, then
               a rename into prepared/dt=D (jobs.prepare_io.commit_partition)

Layout and types: the "Prepared data" contract in twotower.contracts. Rules this job adds:
  * dedup: one row per event_id; differing copies keep the earliest (see dedup_events);
  * vocabulary base: the latest complete partition before D with the same schema_version;
    ids new in the window are appended by (first ts, id), then ids known only from the
    attribute tables by id; attribute tokens new to the vocabulary are appended by token;
  * a user with a single event in the window has no eval row: that event stays in train
    (an eval query without any training signal of the user would measure cold start, which
    the leave-last-out protocol does not intend);
  * item_freq covers every vocabulary item; an item without train interactions has count 0
    and prob 0.0 (callers floor it before taking a log; it is never an in-batch positive);
  * output is deterministic: rows are sorted before writing ((user_idx, event order) for
    examples, idx for the other tables) and files get fixed names, so re-running D gives
    identical tables.

Run it alone: ``python -m jobs.prepare --date 1998-04-22`` (settings from the environment).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from pyspark.sql import DataFrame, SparkSession

from jobs import prepare_transform as tf
from jobs import prepare_vocab as pv
from jobs.prepare_io import (
    DayWindow,
    PrepareError,
    RawInput,
    check_attr_table,
    collect_spark_output,
    commit_partition,
    find_base_partition,
    find_raw_input,
)
from jobs.prepare_schema import PREPARED_SCHEMAS, SPLIT_TABLES
from jobs.raw_snapshot import raw_snapshot
from twotower.config import PrepareConfig, Settings, load_settings
from twotower.contracts import day_str, parse_day, prepared_partition

log = logging.getLogger(__name__)


# --- extract ------------------------------------------------------------------------------------

LISTING_ON_DRIVER_MAX = 10_000
"""Up to this many raw files, Spark checks them on the driver instead of in a distributed job."""


def job_session(spark: SparkSession, n_files: int) -> SparkSession:
    """A session for this job: the caller's SparkContext and cache, its own SQL settings.

    Spark lists more than 32 input paths with a distributed job (one task per path): 213 tasks
    and several seconds for MovieLens' 213 day partitions, where the driver needs milliseconds.
    The files were already listed and checked (find_raw_input), so the driver does it here; the
    caller's session keeps its settings.
    """
    session = spark.newSession()
    threshold = max(32, min(n_files, LISTING_ON_DRIVER_MAX) + 1)
    session.conf.set("spark.sql.sources.parallelPartitionDiscovery.threshold", str(threshold))
    return session


def spark_path(path: Path) -> str:
    """A local (or shared-mount) path as Spark/Hadoop wants it. Not Path.as_uri(): Hadoop does not
    decode its %3D for the '=' of ``dt=...``; and an explicit ``file://`` keeps a cluster whose
    default file system is HDFS on the mounted state directory."""
    return "file://" + str(path.resolve())


@dataclass
class Inputs:
    """What the job reads (extract step): the raw events lazily in Spark, the small tables in Arrow."""

    events: DataFrame  # RAW_READ_SCHEMA rows of the window's partitions, as stored
    user_attrs: dict[str, list[str]]  # {user_id: tokens} from raw/users.parquet ({} when absent)
    item_attrs: dict[str, list[str]]  # {item_id: tokens} from raw/items.parquet
    base_vocab: dict[str, pa.Table]  # vocab_users / vocab_items / vocab_attrs of the base (maybe empty)


def read_attrs(raw_dir: Path, kind: str) -> dict[str, list[str]]:
    """{id: tokens} of raw/<kind>.parquet (kind: users | items); {} with a warning when absent."""
    key = "user_id" if kind == "users" else "item_id"
    path = raw_dir / f"{kind}.parquet"
    if not check_attr_table(path, key):
        log.warning("no attribute table %s: %s get no attributes", path, kind)
        return {}
    return pv.clean_attrs(pq.read_table(path, columns=[key, "attrs"]), key)


def read_base_vocab(base: Path | None) -> dict[str, pa.Table]:
    """The three vocabularies of the base partition (empty ones when there is none)."""
    out = {}
    for name, key in pv.VOCAB_KEYS.items():
        if base is None:
            out[name] = pv.empty_vocab(name)
            continue
        try:
            out[name] = pq.read_table(base / f"{name}.parquet", columns=[key, "idx"]).cast(PREPARED_SCHEMAS[name])
        except Exception as exc:  # a broken base must stop the run: new indices would collide
            raise PrepareError(f"vocabulary base prepared/{base.name}/{name}.parquet is unreadable: {exc}") from None
    return out


def extract(spark: SparkSession, raw: RawInput, base: Path | None) -> Inputs:
    """The window's raw files as a DataFrame, the attribute tables and the base vocabularies."""
    events = spark.read.schema(tf.RAW_READ_SCHEMA).parquet(*[spark_path(p) for p in raw.files])
    return Inputs(
        events=events,
        user_attrs=read_attrs(raw.raw_dir, "users"),
        item_attrs=read_attrs(raw.raw_dir, "items"),
        base_vocab=read_base_vocab(base),
    )


# --- transform ----------------------------------------------------------------------------------


class Progress:
    """Log lines of one run, each with the seconds since it started."""

    def __init__(self, day: dt.date):
        self.day = day
        self.started = time.monotonic()

    def seconds(self) -> float:
        return time.monotonic() - self.started

    def say(self, text: str) -> None:
        log.info("prepare %s: %s (%.1f s)", self.day, text, self.seconds())


@dataclass
class Small:
    """The per-id tables, built on the driver."""

    vocab_users: pa.Table
    vocab_items: pa.Table
    vocab_attrs: pa.Table
    users: pa.Table
    items: pa.Table


def vocabularies(inputs: Inputs, seen: pa.Table) -> Small:
    """Stable vocabularies and the users/items tables from the first-seen aggregate
    (``kind, id, first_ts``, see prepare_transform.first_seen) and the attribute tables."""
    first: dict[str, dict[str, int]] = {"user": {}, "item": {}}
    for kind, ident, ts in zip(seen["kind"].to_pylist(), seen["id"].to_pylist(), seen["first_ts"].to_pylist()):
        first[kind][ident] = ts
    base = inputs.base_vocab
    vocab_users = pv.extend_vocab(base["vocab_users"], "vocab_users", first["user"], inputs.user_attrs)
    vocab_items = pv.extend_vocab(base["vocab_items"], "vocab_items", first["item"], inputs.item_attrs)
    tokens = pv.attr_tokens(inputs.user_attrs, inputs.item_attrs)
    vocab_attrs = pv.extend_vocab(base["vocab_attrs"], "vocab_attrs", catalog=tokens)
    return Small(
        vocab_users=vocab_users,
        vocab_items=vocab_items,
        vocab_attrs=vocab_attrs,
        users=pv.entity_table(vocab_users, inputs.user_attrs, vocab_attrs, "users"),
        items=pv.entity_table(vocab_items, inputs.item_attrs, vocab_attrs, "items"),
    )


def split_counts(counts: pa.Table) -> tuple[int, int, dict[int, int]]:
    """(n_train, n_eval, {item_idx: train count}) from the ``is_eval, item_idx, count`` aggregate."""
    n_train = n_eval = 0
    train_counts: dict[int, int] = {}
    for is_eval, item, count in zip(counts["is_eval"].to_pylist(), counts["item_idx"].to_pylist(), counts["count"].to_pylist()):
        if is_eval:
            n_eval += count
        else:
            n_train += count
            train_counts[item] = count
    return n_train, n_eval, train_counts


@dataclass
class Prepared:
    """Everything the load step writes: the driver-built tables and the cached examples."""

    small: Small
    item_freq: pa.Table
    examples: DataFrame  # build_examples output, cached
    n_events: int
    n_train: int
    n_eval: int
    cached: list[DataFrame]  # to unpersist once written


def transform(spark: SparkSession, inputs: Inputs, window: DayWindow, history_len: int, progress: Progress) -> Prepared:
    """Window + dedup, vocabularies, examples and their split. Runs the few Spark actions whose
    results the next steps need (counts and the small aggregates), caching what is read twice.
    Raises PrepareError when the window holds no event."""
    events = tf.dedup_events(tf.window_events(inputs.events, window.start_ms, window.cutoff_ms)).cache()
    cached = [events]
    try:
        n_events = events.count()
        if n_events == 0:
            raise PrepareError(f"no event with a timestamp in {window.first_day}..{window.day} in the raw partitions read")
        progress.say(f"{n_events:,} events in the window after dedup")

        small = vocabularies(inputs, tf.first_seen(events).toArrow())
        new = [small.vocab_users.num_rows, small.vocab_items.num_rows, small.vocab_attrs.num_rows]
        old = [inputs.base_vocab[n].num_rows for n in ("vocab_users", "vocab_items", "vocab_attrs")]
        progress.say(
            f"vocabularies: {new[0]:,} users, {new[1]:,} items, {new[2]:,} attribute tokens "
            f"({new[0] - old[0]:,}, {new[1] - old[1]:,} and {new[2] - old[2]:,} of them new)"
        )

        vocab_users, vocab_items = spark.createDataFrame(small.vocab_users), spark.createDataFrame(small.vocab_items)
        examples = tf.build_examples(tf.index_events(events, vocab_users, vocab_items), history_len).cache()
        cached.append(examples)
        n_train, n_eval, train_counts = split_counts(tf.split_item_counts(examples).toArrow())
        if n_train + n_eval != n_events:
            raise PrepareError(f"{n_events:,} events but {n_train + n_eval:,} examples: an id is missing from a vocabulary")
        progress.say(f"{n_train:,} train and {n_eval:,} eval examples")
    except BaseException:
        for df in cached:
            df.unpersist()
        raise
    item_freq = pv.item_freq(small.vocab_items, train_counts)
    return Prepared(small, item_freq, examples, n_events, n_train, n_eval, cached)


# --- load ---------------------------------------------------------------------------------------


def write_small(table: pa.Table, tmp: Path, name: str) -> int:
    """Write a driver-built table as ``<name>.parquet``; returns its row count."""
    pq.write_table(table.cast(PREPARED_SCHEMAS[name]), tmp / f"{name}.parquet")
    return table.num_rows


def write_spark(df: DataFrame, tmp: Path, name: str, sort: list[str], n_files: int = 1, split_by: str = "") -> int:
    """Write an event-level table from Spark; returns its row count.

    train/eval: ``<name>/part-NNNNN.parquet`` with rows spread over ``n_files`` files by a hash
    of ``split_by`` (deterministic); other tables: one ``<name>.parquet``. Each file is sorted by
    ``sort``.
    """
    schema = PREPARED_SCHEMAS[name]
    parts = df.repartition(n_files, split_by) if n_files > 1 else df.repartition(1)
    staging = tmp / f".spark-{name}"
    tf.conform(parts.sortWithinPartitions(*sort), schema).write.parquet(spark_path(staging))
    single = name not in SPLIT_TABLES
    return collect_spark_output(staging, tmp / (f"{name}.parquet" if single else name), schema, single)


def files_for(rows: int, rows_per_file: int) -> int:
    """Files for a split of ``rows`` rows: enough that none exceeds ``rows_per_file``."""
    return max(1, math.ceil(rows / max(1, rows_per_file)))


def load(tmp: Path, prepared: Prepared, cfg: PrepareConfig, progress: Progress) -> dict[str, int]:
    """Write every table into the partition being built; returns each table's row count as written."""
    rows = {name: write_small(getattr(prepared.small, name), tmp, name) for name in ("vocab_users", "vocab_items", "vocab_attrs", "users", "items")}
    rows["item_freq"] = write_small(prepared.item_freq, tmp, "item_freq")
    splits = (("train", prepared.n_train, tf.train_split), ("eval", prepared.n_eval, tf.eval_split))
    for name, count, select in splits:
        n_files = files_for(count, cfg.rows_per_file)
        rows[name] = write_spark(select(prepared.examples), tmp, name, ["user_idx", "pos"], n_files, "user_idx")
        progress.say(f"wrote {name}: {rows[name]:,} examples in {n_files} file(s)")
    histories = tf.user_histories(prepared.examples, cfg.history_len)
    rows["user_history"] = write_spark(histories, tmp, "user_history", ["user_idx"])
    progress.say(f"wrote the last {cfg.history_len} events of {rows['user_history']:,} users")
    return rows


def build_manifest(cfg: PrepareConfig, window: DayWindow, raw: RawInput, base: Path | None, n_events: int, rows: dict) -> dict:
    """manifest.json (MANIFEST_KEYS plus vocab_base and n_raw_rows). Deterministic, no timings:
    the training version is a hash of it."""
    return {
        "schema_version": cfg.schema_version,
        "logical_date": day_str(window.day),
        "window_days": window.days,
        "window_start_ms": window.start_ms,
        "data_cutoff_ms": window.cutoff_ms,
        "history_len": cfg.history_len,
        "n_events": n_events,
        "n_users": rows["vocab_users"],
        "n_items": rows["vocab_items"],
        "n_attrs": rows["vocab_attrs"],
        "n_train": rows["train"],
        "n_eval": rows["eval"],
        "raw_partitions": list(raw.partitions),
        "vocab_base": base.name if base else None,
        "n_raw_rows": raw.n_rows,
    }


# --- the job ------------------------------------------------------------------------------------


def run_prepare(settings: Settings, day: dt.date, spark: SparkSession | None = None) -> Path:
    """Build ``prepared/dt=D`` from the raw window ending at ``day``; returns the partition path.

    Re-running a day replaces its partition only once the new one is complete. Raises
    PrepareError (nothing written, any previous D partition untouched) when no raw partition
    exists in the window, when a raw partition is unreadable (the message names it) or when the
    window holds no event; any other failure propagates with the same guarantee. ``spark``: the
    session to use (default: jobs.spark.get_spark); it is left running.
    """
    cfg = settings.prepare
    if cfg.window_days < 1 or cfg.history_len < 1:
        raise ValueError(f"prepare needs window_days >= 1 and history_len >= 1, got {cfg.window_days}, {cfg.history_len}")
    window = DayWindow(day, cfg.window_days)
    # a fixed view: what the archiver or a backfill writes meanwhile waits for the next run
    with raw_snapshot(settings.paths.raw_dir, window.dates()) as read_dir:
        return _prepare(settings, window, find_raw_input(read_dir, window, shown_as=settings.paths.raw_dir), spark)


def _prepare(settings: Settings, window: DayWindow, raw: RawInput, spark: SparkSession | None) -> Path:
    """run_prepare on the listed and checked raw input (all of it read before this returns)."""
    cfg, day = settings.prepare, window.day
    progress = Progress(day)
    target = prepared_partition(settings.paths.prepared_dir, day)
    if raw.n_rows == 0:
        raise PrepareError(f"the raw partitions of the window ({', '.join(raw.partitions)}) hold no rows")
    base = find_base_partition(settings.paths.prepared_dir, day, cfg.schema_version)
    progress.say(
        f"window {window.first_day}..{window.day} ({window.days} days): {len(raw.partitions)} raw day partitions, "
        f"{raw.n_rows:,} rows to read; "
        + (f"vocabularies extend those of prepared/{base.name}" if base else "no earlier partition, vocabularies start empty")
    )
    if spark is None:
        from jobs.spark import get_spark

        spark = get_spark(settings.spark)
        progress.say("Spark session ready")
    spark = job_session(spark, len(raw.files))

    def fill(tmp: Path) -> None:
        rows = load(tmp, prepared, cfg, progress)
        manifest = build_manifest(cfg, window, raw, base, prepared.n_events, rows)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")

    try:
        prepared = transform(spark, extract(spark, raw, base), window, cfg.history_len, progress)
        try:
            commit_partition(target, fill)
        finally:
            for df in prepared.cached:
                df.unpersist()
    except PrepareError:
        raise
    except Exception as exc:
        bad = raw.partition_named_in(str(exc))
        if bad is None:
            raise
        first_line = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise PrepareError(f"raw partition {bad} could not be read; nothing was written: {first_line}") from exc
    progress.say(f"done: {target} is complete")
    return target


def main(argv: list[str] | None = None) -> None:
    """``python -m jobs.prepare --date YYYY-MM-DD``: prepare one logical date."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--date", required=True, type=parse_day, help="logical date D (YYYY-MM-DD)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(run_prepare(load_settings(), args.date))


if __name__ == "__main__":
    main()

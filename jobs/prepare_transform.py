"""The event-level transforms of the prepare job: pure DataFrame -> DataFrame functions (DESIGN §10).

Nothing here reads or writes files or triggers a Spark action; each function is lazy and can be
tested on a handful of rows. ``jobs.prepare`` wires them together between extract and load; the
per-id tables (vocabularies, attributes, item frequencies) are built on the driver by
``jobs.prepare_vocab`` from the small aggregates computed here.

Column vocabulary used below (the raw event contract, twotower.contracts):
    event_id, user_id, item_id, event_type: string; ts: int64 epoch ms; weight: float32
and, once indexed, user_idx / item_idx: int32 (>= 1; 0 is padding / out-of-vocabulary).

The per-user event order is (ts, len(item_id), item_id, event_id): on a same-timestamp tie the
item id decides, shorter ids first and then as strings, which is numeric order for numeric ids
("9" < "10", as DESIGN §9's protocol breaks MovieLens ties) and a fixed order for any other ids;
event_id is unique after dedup, which makes the order total and every result below deterministic.
"""

from __future__ import annotations

import pyarrow as pa
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T


def event_order() -> list:
    """Total order of one user's events (the contract's example ordering), as Spark columns."""
    return [F.col("ts"), F.length("item_id"), F.col("item_id"), F.col("event_id")]

RAW_READ_SCHEMA = T.StructType(
    [
        T.StructField("event_id", T.StringType()),
        T.StructField("user_id", T.StringType()),
        T.StructField("item_id", T.StringType()),
        T.StructField("event_type", T.StringType()),
        T.StructField("ts", T.LongType()),
        T.StructField("weight", T.FloatType()),
    ]
)
"""Columns of the raw events the job reads (``hour`` is derived from ts and not needed)."""

_ARROW_TO_SPARK = {
    pa.int32(): T.IntegerType(),
    pa.int64(): T.LongType(),
    pa.float32(): T.FloatType(),
    pa.float64(): T.DoubleType(),
    pa.string(): T.StringType(),
}


def spark_type(arrow_type: pa.DataType) -> T.DataType:
    """The Spark type that Parquet-round-trips to ``arrow_type`` (lists hold nullable elements)."""
    if pa.types.is_list(arrow_type):
        return T.ArrayType(spark_type(arrow_type.value_type), containsNull=True)
    return _ARROW_TO_SPARK[arrow_type]


def conform(df: DataFrame, schema: pa.Schema) -> DataFrame:
    """``df`` reduced to the contract's columns, in its order and types, every field nullable.

    Why the union: Spark writes a column it knows is never null as a Parquet ``required`` field,
    and pyarrow then reads ``int32 not null``, which does not equal the contract schema. A plain
    cast is optimised away, and so is a union with an empty relation the optimiser can see is
    empty (a local relation, a ``where false``), nullability with it. An empty range is opaque
    to it: the union stays, its output is nullable, and its one empty partition comes after
    ``df``'s partitions and writes no file, so files and row order stay as they are.
    (collect_spark_output checks every written schema, so a smarter optimiser fails loudly.)
    """
    types = [(f.name, spark_type(f.type)) for f in schema]
    empty = df.sparkSession.range(0, numPartitions=1).select(*[F.lit(None).cast(t).alias(name) for name, t in types])
    return df.select(*[F.col(name).cast(t).alias(name) for name, t in types]).unionByName(empty)


# --- events -------------------------------------------------------------------------------------


def window_events(raw: DataFrame, start_ms: int, end_ms: int) -> DataFrame:
    """Raw rows with ``start_ms <= ts < end_ms`` and every required field present.

    Returns event_id, user_id, item_id, event_type, ts, weight (float32; a missing weight is
    1.0, the contract's default). Rows without an id or ts cannot be placed and are dropped.
    """
    return raw.where(
        (F.col("ts") >= F.lit(start_ms))
        & (F.col("ts") < F.lit(end_ms))
        & F.col("event_id").isNotNull()
        & F.col("user_id").isNotNull()
        & F.col("item_id").isNotNull()
    ).select(
        "event_id",
        "user_id",
        "item_id",
        "event_type",
        "ts",
        F.coalesce(F.col("weight"), F.lit(1.0)).cast(T.FloatType()).alias("weight"),
    )


def dedup_events(events: DataFrame) -> DataFrame:
    """One row per event_id. When copies differ, the earliest wins: the smallest
    (ts, user_id, item_id, event_type, weight), so the choice never depends on file order."""
    copies = Window.partitionBy("event_id").orderBy("ts", "user_id", "item_id", "event_type", "weight")
    return events.withColumn("_copy", F.row_number().over(copies)).where(F.col("_copy") == 1).drop("_copy")


def first_seen(events: DataFrame) -> DataFrame:
    """``kind, id, first_ts``: the earliest ts of each user (kind "user") and item (kind "item")
    in the events; one row per id, small enough to collect (vocabularies are built from it)."""
    users = events.select(F.lit("user").alias("kind"), F.col("user_id").alias("id"), "ts")
    items = events.select(F.lit("item").alias("kind"), F.col("item_id").alias("id"), "ts")
    return users.unionByName(items).groupBy("kind", "id").agg(F.min("ts").alias("first_ts"))


# --- examples -------------------------------------------------------------------------------


def index_events(events: DataFrame, vocab_users: DataFrame, vocab_items: DataFrame) -> DataFrame:
    """Events with ``user_idx`` and ``item_idx`` (int32) attached; every id must be in the vocabularies."""
    users = vocab_users.select("user_id", F.col("idx").alias("user_idx"))
    items = vocab_items.select("item_id", F.col("idx").alias("item_idx"))
    return events.join(users, "user_id").join(items, "item_id")


def build_examples(indexed: DataFrame, history_len: int) -> DataFrame:
    """One example per event: indexed columns plus

    pos:     1-based position of the event in its user's event order (see module docstring);
    n_user:  the user's event count in the window;
    hist:    list<int32>, item_idx of the ``history_len`` events strictly before this one in that
             order, oldest first ([] for a user's first event);
    is_eval: True for a user's last event when the user has at least two events.

    The history frame ends one row before the current row, so nothing at or after the target can
    enter it. collect_list over an ordered ROWS frame appends rows in frame order, which is the
    sort order of the window (not a shuffle order), so hist is deterministic.
    """
    if history_len < 1:
        raise ValueError(f"history_len must be >= 1, got {history_len}")
    by_user = Window.partitionBy("user_idx").orderBy(*event_order())
    whole = by_user.rowsBetween(Window.unboundedPreceding, Window.unboundedFollowing)
    out = (
        indexed.withColumn("pos", F.row_number().over(by_user))
        .withColumn("n_user", F.count(F.lit(1)).over(whole))
        .withColumn("hist", F.collect_list("item_idx").over(by_user.rowsBetween(-history_len, -1)))
    )
    return out.withColumn("is_eval", (F.col("pos") == F.col("n_user")) & (F.col("n_user") >= 2))


def train_split(examples: DataFrame) -> DataFrame:
    """Every example except each user's held-out last interaction (users with one event keep it here)."""
    return examples.where(~F.col("is_eval"))


def eval_split(examples: DataFrame) -> DataFrame:
    """Each user's last interaction, for users with at least two events in the window."""
    return examples.where(F.col("is_eval"))


def split_item_counts(examples: DataFrame) -> DataFrame:
    """``is_eval, item_idx, count`` (int64): examples per split and item; small enough to collect.
    Gives the split sizes and the train item frequencies in one pass."""
    return examples.groupBy("is_eval", "item_idx").agg(F.count(F.lit(1)).cast(T.LongType()).alias("count"))


def user_histories(examples: DataFrame, history_len: int) -> DataFrame:
    """``user_idx, hist, hist_ts, hist_event_ids``: each user's last ``history_len`` events over
    the whole window (train and eval), oldest first: the history at the data cutoff."""
    last = examples.where(F.col("pos") > F.col("n_user") - history_len)
    rows = F.array_sort(F.collect_list(F.struct("pos", "item_idx", "ts", "event_id"))).alias("h")
    per_user = last.groupBy("user_idx").agg(rows)
    return per_user.select(
        "user_idx",
        F.col("h.item_idx").alias("hist"),
        F.col("h.ts").alias("hist_ts"),
        F.col("h.event_id").alias("hist_event_ids"),
    )

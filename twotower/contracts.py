"""Data contracts between the parts of the pipeline (DESIGN §3). Pure: names, schemas, paths.

Raw events (ingest, archiver)
    ``raw/dt=YYYY-MM-DD/part-*.parquet``, columns RAW_EVENT_SCHEMA; ``hour`` is the UTC hour of
    ``ts``. Attribute side tables: ``raw/users.parquet`` and ``raw/items.parquet`` with
    ``user_id``/``item_id`` (string) and ``attrs`` (list<string> of ``name=value`` tokens, e.g.
    ``gender=M``, ``genre=Comedy``). The attribute tables are snapshots, not partitioned.

Prepared data (Spark prepare job), one directory per logical date D: ``prepared/dt=D/``
    vocab_users.parquet   user_id:string, idx:int32   (idx >= 1; 0 = padding / out-of-vocabulary)
    vocab_items.parquet   item_id:string, idx:int32   (same rule)
    vocab_attrs.parquet   token:string, idx:int32     (user and item attribute tokens, one vocabulary)
        Vocabularies are stable: D's vocabulary is the latest earlier partition's vocabulary with
        the ids first seen in D's window appended, ordered by (first ts, id).
    users.parquet         user_idx:int32, user_id:string, attrs:list<int32>   (every vocab user)
    items.parquet         item_idx:int32, item_id:string, attrs:list<int32>   (every vocab item: the corpus)
    train/*.parquet       EXAMPLE_SCHEMA, every interaction in the window but each user's last
    eval/*.parquet        EXAMPLE_SCHEMA, each user's last interaction in the window (ties broken by item id, see below)
    item_freq.parquet     item_idx:int32, count:int64, prob:float64   (over train; for logQ)
    user_history.parquet  user_idx:int32, hist:list<int32>, hist_ts:list<int64>, hist_event_ids:list<string>
                          (last L events of every user over the whole window, train and eval, oldest
                          first: what the serving layer needs at the data cutoff)
    manifest.json         see MANIFEST_KEYS
    _SUCCESS              written last; a partition without it is incomplete and never read.

    Example ordering: a user's events are totally ordered by (ts, len(item_id), item_id, event_id)
    (numeric order for numeric ids, so MovieLens ties break as DESIGN §9 does). ``hist`` of
    an example holds the item_idx of the last L events strictly before it in that order, oldest
    first; no event at or after the target is ever in it.

Model artifacts, one directory per version: ``artifacts/<version>/`` (see ARTIFACT_FILES).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pyarrow as pa

SCHEMA_VERSION = 1

RAW_EVENT_SCHEMA = pa.schema(
    [
        ("event_id", pa.string()),
        ("user_id", pa.string()),
        ("item_id", pa.string()),
        ("event_type", pa.string()),
        ("ts", pa.int64()),  # epoch milliseconds, UTC
        ("weight", pa.float32()),
        ("hour", pa.int32()),  # UTC hour of ts, 0..23
    ]
)

ATTR_TABLE_SCHEMA = {
    "users": pa.schema([("user_id", pa.string()), ("attrs", pa.list_(pa.string()))]),
    "items": pa.schema([("item_id", pa.string()), ("attrs", pa.list_(pa.string()))]),
}

EXAMPLE_SCHEMA = pa.schema(
    [
        ("user_idx", pa.int32()),
        ("item_idx", pa.int32()),
        ("ts", pa.int64()),
        ("weight", pa.float32()),
        ("hist", pa.list_(pa.int32())),
    ]
)

MANIFEST_KEYS = (
    "schema_version",  # int
    "logical_date",  # "YYYY-MM-DD"
    "window_days",  # int
    "window_start_ms",  # int, inclusive
    "data_cutoff_ms",  # int, exclusive: midnight UTC after D
    "history_len",  # int L
    "n_events",  # int, events in the window after dedup
    "n_users",  # int, vocabulary size (excluding padding)
    "n_items",  # int
    "n_attrs",  # int
    "n_train",  # int
    "n_eval",  # int
    "raw_partitions",  # list of "dt=..." read
)

ARTIFACT_FILES = {
    "model": "model.pt",  # torch state_dict, loaded with weights_only=True
    "config": "config.json",  # ModelConfig + sizes needed to rebuild the model
    "item_embeddings": "item_embeddings.npy",  # float32 [n_items + 1, dim], row 0 = padding (zeros)
    "index": "index.faiss",  # CPU Faiss index over rows 1..n_items, ids = item_idx
    "index_meta": "index.json",  # type, nlist, m, nbits, nprobe, ann_recall_at_100, fallback reason
    "metrics": "metrics.json",  # offline metrics, exact and through the index, plus baselines
    "manifest": "manifest.json",  # version, data cutoff, prepared manifest, timings
    "vocab_users": "vocab_users.parquet",
    "vocab_items": "vocab_items.parquet",
    "users": "users.parquet",
    "items": "items.parquet",
}

SUCCESS_MARKER = "_SUCCESS"


def day_str(day: dt.date) -> str:
    """``YYYY-MM-DD`` for a date."""
    return day.isoformat()


def parse_day(text: str) -> dt.date:
    """Parse ``YYYY-MM-DD``; raises ValueError with the offending text."""
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise ValueError(f"not a date in YYYY-MM-DD form: {text!r}") from None


def day_start_ms(day: dt.date) -> int:
    """Epoch milliseconds of midnight UTC starting ``day``."""
    return int(dt.datetime(day.year, day.month, day.day, tzinfo=dt.timezone.utc).timestamp() * 1000)


def day_of_ms(ts_ms: int) -> dt.date:
    """UTC calendar date of an epoch-milliseconds timestamp."""
    return dt.datetime.fromtimestamp(ts_ms / 1000, tz=dt.timezone.utc).date()


def raw_partition(raw_dir: Path, day: dt.date) -> Path:
    """Directory of one day of raw events."""
    return raw_dir / f"dt={day_str(day)}"


def prepared_partition(prepared_dir: Path, day: dt.date) -> Path:
    """Directory of the prepared data of logical date ``day``."""
    return prepared_dir / f"dt={day_str(day)}"


def is_complete(partition: Path) -> bool:
    """True when a partition directory was finished (its success marker exists)."""
    return (partition / SUCCESS_MARKER).exists()

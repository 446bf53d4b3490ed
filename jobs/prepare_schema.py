"""Arrow schemas of the prepared tables (the "Prepared data" contract in twotower.contracts).

Every field is nullable, as in EXAMPLE_SCHEMA, so ``pq.read_schema(file).equals(schema)`` holds
for each file the prepare job writes (Spark-written and pyarrow-written alike).
"""

from __future__ import annotations

import pyarrow as pa

from twotower.contracts import EXAMPLE_SCHEMA

PREPARED_SCHEMAS: dict[str, pa.Schema] = {
    "vocab_users": pa.schema([("user_id", pa.string()), ("idx", pa.int32())]),
    "vocab_items": pa.schema([("item_id", pa.string()), ("idx", pa.int32())]),
    "vocab_attrs": pa.schema([("token", pa.string()), ("idx", pa.int32())]),
    "users": pa.schema([("user_idx", pa.int32()), ("user_id", pa.string()), ("attrs", pa.list_(pa.int32()))]),
    "items": pa.schema([("item_idx", pa.int32()), ("item_id", pa.string()), ("attrs", pa.list_(pa.int32()))]),
    "train": EXAMPLE_SCHEMA,
    "eval": EXAMPLE_SCHEMA,
    "item_freq": pa.schema([("item_idx", pa.int32()), ("count", pa.int64()), ("prob", pa.float64())]),
    "user_history": pa.schema(
        [
            ("user_idx", pa.int32()),
            ("hist", pa.list_(pa.int32())),
            ("hist_ts", pa.list_(pa.int64())),
            ("hist_event_ids", pa.list_(pa.string())),
        ]
    ),
}

SPLIT_TABLES = ("train", "eval")
"""Tables written as a directory of part files (``train/part-00000.parquet``, ...); every other
table is a single file ``<name>.parquet``."""

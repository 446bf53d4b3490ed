"""Ingest: source files -> raw event Parquet by day plus user/item attribute tables (DESIGN §3).

Sources:
  * MovieLens-100K (``u.data`` ratings, ``u.user`` profiles, ``u.item`` genres and year);
  * any interactions file, CSV or Parquet, with columns ``user_id,item_id,ts`` and optional
    ``event_type,weight,event_id``.

Timestamps: ``ts`` may be epoch seconds or epoch milliseconds. The unit is detected per file
from the largest value: below 1e11 it is seconds (1e11 s is the year 5138, while 1e11 ms is
1973), otherwise milliseconds. Raw Parquet always stores milliseconds.

Bad rows (missing ids, unparsable or out-of-range ts, negative/NaN weight) are counted per
reason, reported, and skipped; a file with no valid row fails with a clear message.

Writes are per day partition and atomic (temporary directory, then rename), so re-ingesting
the same file gives the same partitions and a failed ingest leaves the old ones in place.
"""

from __future__ import annotations

import logging
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from twotower.atomic import atomic_write_dir, dir_lock
from twotower.contracts import ATTR_TABLE_SCHEMA, RAW_EVENT_SCHEMA, day_of_ms

log = logging.getLogger(__name__)

MS_THRESHOLD = 100_000_000_000  # 1e11: max ts below this => seconds
MIN_TS_MS = 0  # 1970-01-01
MAX_TS_MS = 4_102_444_800_000  # 2100-01-01: anything later is a broken clock
MAX_ID_LEN = 256


@dataclass
class IngestReport:
    """What an ingest did: rows read, rows written, rows skipped per reason, days written."""

    source: str
    rows_read: int = 0
    rows_written: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    days: list[str] = field(default_factory=list)
    ts_unit: str = ""

    def summary(self) -> str:
        skipped = ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items())) or "none"
        return (
            f"ingested {self.rows_written:,} of {self.rows_read:,} rows from {self.source} "
            f"into {len(self.days)} day partitions (ts unit: {self.ts_unit}); skipped: {skipped}"
        )


def detect_ts_unit(ts: np.ndarray) -> str:
    """``"s"`` or ``"ms"`` from the largest finite timestamp (see module docstring)."""
    finite = ts[np.isfinite(ts)]
    if finite.size == 0:
        return "s"
    return "s" if float(np.max(finite)) < MS_THRESHOLD else "ms"


def normalise_events(table: pa.Table, source: str) -> tuple[pa.Table, IngestReport]:
    """Validate and convert a table with at least user_id, item_id, ts to RAW_EVENT_SCHEMA.

    Pure: returns the valid rows (deduplicated by event_id, sorted by ts) and a report.
    Raises ValueError when a required column is missing or no row is valid.
    """
    missing = {"user_id", "item_id", "ts"} - set(table.column_names)
    if missing:
        raise ValueError(
            f"{source}: missing required column(s) {sorted(missing)}; "
            f"expected user_id,item_id,ts with optional event_type,weight,event_id; got {table.column_names}"
        )
    report = IngestReport(source=source, rows_read=table.num_rows)
    n = table.num_rows
    user = pc.utf8_trim_whitespace(pc.cast(table["user_id"], pa.string()))
    item = pc.utf8_trim_whitespace(pc.cast(table["item_id"], pa.string()))
    ts_raw = pc.cast(table["ts"], pa.float64(), safe=False).to_numpy(zero_copy_only=False)
    ts_raw = np.where(np.isnan(ts_raw), np.nan, ts_raw)
    unit = detect_ts_unit(ts_raw)
    report.ts_unit = "seconds" if unit == "s" else "milliseconds"
    ts_ms = ts_raw * (1000.0 if unit == "s" else 1.0)

    if "weight" in table.column_names:
        weight = pc.cast(table["weight"], pa.float64(), safe=False).to_numpy(zero_copy_only=False)
        weight = np.where(np.isnan(weight), 1.0, weight)  # optional field: missing means 1.0
    else:
        weight = np.ones(n)
    if "event_type" in table.column_names:
        etype = pc.fill_null(pc.cast(table["event_type"], pa.string()), "interaction")
    else:
        etype = pa.array(["interaction"] * n, pa.string())

    reasons = [
        ("missing user_id", pc.fill_null(pc.equal(pc.utf8_length(user), 0), True).to_numpy(zero_copy_only=False)),
        ("missing item_id", pc.fill_null(pc.equal(pc.utf8_length(item), 0), True).to_numpy(zero_copy_only=False)),
        (
            "id longer than 256 characters",
            pc.fill_null(
                pc.or_(pc.greater(pc.utf8_length(user), MAX_ID_LEN), pc.greater(pc.utf8_length(item), MAX_ID_LEN)),
                False,
            ).to_numpy(zero_copy_only=False),
        ),
        ("missing or non-numeric ts", ~np.isfinite(ts_ms)),
        ("ts out of range (before 1970 or after 2100)", np.isfinite(ts_ms) & ((ts_ms < MIN_TS_MS) | (ts_ms > MAX_TS_MS))),
        ("negative or non-finite weight", ~np.isfinite(weight) | (weight < 0)),
    ]
    bad = np.zeros(n, dtype=bool)
    for why, mask in reasons:
        newly = mask & ~bad  # each row is counted once, under its first reason
        if newly.any():
            report.skipped[why] = int(newly.sum())
        bad |= mask
    keep = ~bad
    if not keep.any():
        raise ValueError(f"{source}: no valid rows out of {n:,} ({report.summary()})")

    idx = np.flatnonzero(keep)
    user_k = user.take(idx)
    item_k = item.take(idx)
    etype_k = etype.take(idx)
    ts_k = ts_ms[idx].astype(np.int64)
    if "event_id" in table.column_names:
        eid = pc.cast(table["event_id"], pa.string()).take(idx)
        eid = pc.if_else(pc.is_null(eid), _derived_event_ids(user_k, item_k, ts_k, etype_k), eid)
    else:
        eid = _derived_event_ids(user_k, item_k, ts_k, etype_k)

    out = pa.table(
        {
            "event_id": eid,
            "user_id": user_k,
            "item_id": item_k,
            "event_type": etype_k,
            "ts": pa.array(ts_k, pa.int64()),
            "weight": pa.array(weight[idx], pa.float32()),
            "hour": pa.array(((ts_k // 3_600_000) % 24).astype(np.int32)),
        },
        schema=RAW_EVENT_SCHEMA,
    )
    out = out.sort_by([("ts", "ascending"), ("event_id", "ascending")])
    before = out.num_rows
    out = _dedup_first(out, "event_id")
    if out.num_rows < before:
        report.skipped["duplicate event_id"] = before - out.num_rows
    report.rows_written = out.num_rows
    return out, report


def _derived_event_ids(user: pa.Array, item: pa.Array, ts: np.ndarray, etype: pa.Array) -> pa.Array:
    """Deterministic event id when the source has none: identical rows collapse to one event."""
    return pc.binary_join_element_wise(user, item, pa.array(ts.astype(str)), etype, ":")


def _dedup_first(table: pa.Table, key: str) -> pa.Table:
    """Keep the first row of each key (table already in the order that decides 'first')."""
    keys = table[key].to_numpy(zero_copy_only=False)
    _, first = np.unique(keys, return_index=True)
    return table.take(np.sort(first))


def write_raw_events(events: pa.Table, raw_dir: Path) -> list[str]:
    """Write events (RAW_EVENT_SCHEMA) into day partitions, replacing each touched day whole.

    Returns the ``YYYY-MM-DD`` days written. Each day goes to a temporary directory first and
    is renamed into place, so readers never see half a day.
    """
    raw_dir.mkdir(parents=True, exist_ok=True)
    ts = events["ts"].to_numpy()
    days = (ts // 86_400_000).astype(np.int64)
    written = []
    for day_num in np.unique(days):
        part = events.filter(pa.array(days == day_num))
        day = day_of_ms(int(day_num) * 86_400_000).isoformat()
        target = raw_dir / f"dt={day}"
        with dir_lock(target):  # not while an archiver merges events into this day (streaming.archiver)
            atomic_write_dir(target, lambda d, t=part: pq.write_table(t, d / "part-0.parquet"))
        written.append(day)
    return written


def write_attr_table(rows: dict[str, list[str]], kind: str, raw_dir: Path) -> Path:
    """Write ``raw/<kind>.parquet`` (kind: users | items) from {id: [tokens]} atomically."""
    key = "user_id" if kind == "users" else "item_id"
    ids = sorted(rows)
    table = pa.table({key: ids, "attrs": [rows[i] for i in ids]}, schema=ATTR_TABLE_SCHEMA[kind])
    raw_dir.mkdir(parents=True, exist_ok=True)
    path = raw_dir / f"{kind}.parquet"
    tmp = raw_dir / f".{kind}.{uuid.uuid4().hex}.parquet"
    pq.write_table(table, tmp)
    tmp.replace(path)
    return path


# --- MovieLens-100K ---------------------------------------------------------------------------

ML_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
]  # fmt: skip


def _age_bucket(age: int) -> str:
    for upper, name in ((18, "<18"), (25, "18-24"), (35, "25-34"), (45, "35-44"), (50, "45-49"), (56, "50-55")):
        if age < upper:
            return name
    return "56+"


def movielens_user_attrs(line: str) -> tuple[str, list[str]]:
    """``u.user`` line -> (user_id, tokens). Pure."""
    uid, age, gender, occupation, zipcode = line.rstrip("\n").split("|")
    return uid, [f"age={_age_bucket(int(age))}", f"gender={gender}", f"occupation={occupation}", f"zip1={zipcode[:1]}"]


def movielens_item_attrs(line: str) -> tuple[str, list[str]]:
    """``u.item`` line -> (item_id, tokens: genres and release decade). Pure."""
    parts = line.rstrip("\n").split("|")
    iid, release = parts[0], parts[2]
    flags = parts[5:5 + len(ML_GENRES)]
    tokens = [f"genre={g}" for g, f in zip(ML_GENRES, flags) if f == "1"]
    year = re.search(r"(\d{4})$", release)
    tokens.append(f"decade={year.group(1)[:3]}0s" if year else "decade=unknown")
    return iid, tokens


def read_movielens_ratings(ml_dir: Path) -> pa.Table:
    """``u.data`` (user, item, rating, epoch seconds) as a table with the generic columns.

    Every rating is an interaction (DESIGN §9 treats them all as positives); the rating is
    kept as ``event_type=rating`` and the weight stays 1.0.
    """
    table = pacsv.read_csv(
        ml_dir / "u.data",
        read_options=pacsv.ReadOptions(column_names=["user_id", "item_id", "rating", "ts"]),
        parse_options=pacsv.ParseOptions(delimiter="\t"),
        convert_options=pacsv.ConvertOptions(column_types={"user_id": pa.string(), "item_id": pa.string()}),
    )
    eid = pc.binary_join_element_wise(
        pa.array(["ml100k"] * table.num_rows), table["user_id"], table["item_id"], pc.cast(table["ts"], pa.string()), ":"
    )
    return pa.table(
        {
            "event_id": eid,
            "user_id": table["user_id"],
            "item_id": table["item_id"],
            "event_type": pa.array(["rating"] * table.num_rows),
            "ts": table["ts"],
        }
    )


def ingest_movielens(ml_dir: Path, raw_dir: Path) -> IngestReport:
    """MovieLens-100K -> raw day partitions + users/items attribute tables."""
    if not (ml_dir / "u.data").exists():
        raise FileNotFoundError(f"MovieLens-100K not found: {ml_dir / 'u.data'} does not exist")
    events, report = normalise_events(read_movielens_ratings(ml_dir), str(ml_dir))
    report.days = write_raw_events(events, raw_dir)
    lines_u = (ml_dir / "u.user").read_text(encoding="latin-1").splitlines()
    lines_i = (ml_dir / "u.item").read_text(encoding="latin-1").splitlines()
    write_attr_table(dict(movielens_user_attrs(x) for x in lines_u if x.strip()), "users", raw_dir)
    write_attr_table(dict(movielens_item_attrs(x) for x in lines_i if x.strip()), "items", raw_dir)
    log.info(report.summary())
    return report


# --- generic files ------------------------------------------------------------------------------


def read_interactions_file(path: Path) -> pa.Table:
    """Read a CSV or Parquet interactions file with every column as it is (validation is later)."""
    if not path.exists():
        raise FileNotFoundError(f"interactions file not found: {path}")
    if path.suffix.lower() in (".parquet", ".pq") or path.is_dir():
        return pq.read_table(path)
    if path.suffix.lower() in (".csv", ".tsv", ".txt"):
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
        return pacsv.read_csv(
            path,
            parse_options=pacsv.ParseOptions(delimiter=delimiter, invalid_row_handler=lambda row: "skip"),
            convert_options=pacsv.ConvertOptions(
                column_types={"user_id": pa.string(), "item_id": pa.string(), "event_id": pa.string(), "ts": pa.string()},
                strings_can_be_null=True,
            ),
        )
    raise ValueError(f"unsupported interactions file type {path.suffix!r}: use .csv, .tsv or .parquet")


def _numeric_ts(table: pa.Table) -> pa.Table:
    """CSV ts is read as text so that one bad value cannot fail the whole file; parse it here."""
    if pa.types.is_string(table.schema.field("ts").type):
        values = [_to_float(v) for v in table["ts"].to_pylist()]
        table = table.set_column(table.schema.get_field_index("ts"), "ts", pa.array(values, pa.float64()))
    return table


def _to_float(value: str | None) -> float:
    try:
        return float(value) if value is not None else float("nan")
    except ValueError:
        return float("nan")


def ingest_file(path: Path, raw_dir: Path) -> IngestReport:
    """Generic interactions file -> raw day partitions (no attribute tables: ids only)."""
    table = _numeric_ts(read_interactions_file(path))
    events, report = normalise_events(table, str(path))
    report.days = write_raw_events(events, raw_dir)
    users = sorted(set(events["user_id"].to_pylist()))
    items = sorted(set(events["item_id"].to_pylist()))
    write_attr_table({u: [] for u in users}, "users", raw_dir)
    write_attr_table({i: [] for i in items}, "items", raw_dir)
    log.info(report.summary())
    return report


def ingest_synthetic(raw_dir: Path, spec=None) -> IngestReport:
    """The seeded synthetic generator (jobs.synthetic) -> raw day partitions + attribute tables."""
    from jobs.synthetic import SyntheticSpec, generate

    spec = spec or SyntheticSpec()
    table, user_attrs, item_attrs = generate(spec)
    events, report = normalise_events(table, f"synthetic(seed={spec.seed})")
    report.days = write_raw_events(events, raw_dir)
    write_attr_table(user_attrs, "users", raw_dir)
    write_attr_table(item_attrs, "items", raw_dir)
    log.info(report.summary())
    return report

"""File-system edges of the prepare job: finding and checking its inputs, committing its output.

No Spark here: the raw window is listed and every Parquet footer checked with pyarrow before
Spark starts reading, the base vocabulary partition is chosen from manifests, and a finished
partition is swapped into place with renames.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from twotower.contracts import SUCCESS_MARKER, day_start_ms, day_str, is_complete, parse_day, raw_partition

log = logging.getLogger(__name__)


class PrepareError(RuntimeError):
    """The prepare job cannot produce a partition (missing or unreadable input); nothing was written."""


@dataclass(frozen=True)
class DayWindow:
    """The days one run reads: ``first_day`` .. ``day`` inclusive (W days ending at D)."""

    day: dt.date
    days: int

    @property
    def first_day(self) -> dt.date:
        return self.day - dt.timedelta(days=self.days - 1)

    @property
    def start_ms(self) -> int:
        """Inclusive lower bound on ts: midnight UTC starting the first day."""
        return day_start_ms(self.first_day)

    @property
    def cutoff_ms(self) -> int:
        """Exclusive upper bound on ts: midnight UTC after D (the data cutoff)."""
        return day_start_ms(self.day + dt.timedelta(days=1))

    def dates(self) -> list[dt.date]:
        return [self.first_day + dt.timedelta(days=k) for k in range(self.days)]


@dataclass(frozen=True)
class RawInput:
    """The raw day partitions found in a window, with their Parquet files (already checked)."""

    raw_dir: Path
    partitions: tuple[str, ...]  # "dt=YYYY-MM-DD", oldest first
    files: tuple[Path, ...]
    n_rows: int  # rows in those files, from the footers (before window filter and dedup)

    def partition_named_in(self, message: str) -> str | None:
        """The raw partition whose directory a (Spark) error message mentions, if any."""
        for name in self.partitions:
            if f"{self.raw_dir.resolve()}/{name}/" in message:
                return name
        return None


REQUIRED_RAW_COLUMNS = {"event_id": "string", "user_id": "string", "item_id": "string", "ts": "int64"}
OPTIONAL_RAW_COLUMNS = {"event_type": "string", "weight": "float"}


def visible_parquet_files(directory: Path) -> list[Path]:
    """Parquet files under a directory, skipping hidden/underscore entries (temp dirs, markers)."""
    files = []
    for path in sorted(directory.rglob("*.parquet")):
        rel = path.relative_to(directory).parts
        if not any(p.startswith((".", "_")) for p in rel):
            files.append(path)
    return files


def _check_raw_file(path: Path, partition: str) -> int:
    """Rows in one raw Parquet file; PrepareError naming the partition when it is unreadable or
    lacks a contract column."""
    try:
        meta = pq.read_metadata(path)
        schema = meta.schema.to_arrow_schema()
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for truncated or foreign files
        raise PrepareError(f"raw partition {partition} is unreadable: {path.name}: {exc}") from None
    for name, kind in {**REQUIRED_RAW_COLUMNS, **OPTIONAL_RAW_COLUMNS}.items():
        if name not in schema.names:
            if name in REQUIRED_RAW_COLUMNS:
                raise PrepareError(f"raw partition {partition}: {path.name} has no column {name!r}")
            continue
        typ = schema.field(name).type
        ok = {
            "string": pa.types.is_string(typ) or pa.types.is_large_string(typ),
            "int64": pa.types.is_int64(typ),
            "float": pa.types.is_float32(typ),
        }[kind]
        if not ok:
            raise PrepareError(f"raw partition {partition}: {path.name} column {name!r} is {typ}, expected {kind}")
    return meta.num_rows


def find_raw_input(raw_dir: Path, window: DayWindow, shown_as: Path | None = None) -> RawInput:
    """The existing raw day partitions of the window, every file's footer and columns checked.

    Raises PrepareError when no partition of the window exists, or naming the partition of the
    first unreadable file. ``shown_as``: the raw directory to name in messages when ``raw_dir``
    is a snapshot of it (jobs.raw_snapshot).
    """
    partitions, files, n_rows = [], [], 0
    for day in window.dates():
        part = raw_partition(raw_dir, day)
        if not part.is_dir():
            continue
        partitions.append(part.name)
        for path in visible_parquet_files(part):
            n_rows += _check_raw_file(path, part.name)
            files.append(path)
    if not partitions:
        raise PrepareError(
            f"no raw partition in the window {day_str(window.first_day)}..{day_str(window.day)} "
            f"({window.days} days) under {shown_as or raw_dir}; ingest data for those days first"
        )
    return RawInput(raw_dir=raw_dir, partitions=tuple(partitions), files=tuple(files), n_rows=n_rows)


def check_attr_table(path: Path, key: str) -> bool:
    """True when the attribute table exists and is readable with ``key`` and ``attrs``; False when
    it does not exist (the job then runs without attributes); PrepareError when it is broken."""
    if not path.exists():
        return False
    try:
        schema = pq.read_schema(path)
    except Exception as exc:
        raise PrepareError(f"attribute table {path} is unreadable: {exc}") from None
    if key not in schema.names or "attrs" not in schema.names:
        raise PrepareError(f"attribute table {path} needs columns {key!r} and 'attrs', has {schema.names}")
    return True


# --- the previous partition ----------------------------------------------------------------


def read_manifest(partition: Path) -> dict:
    return json.loads((partition / "manifest.json").read_text())


def find_base_partition(prepared_dir: Path, day: dt.date, schema_version: int) -> Path | None:
    """The latest complete prepared partition with dt < ``day`` and the same schema version, whose
    vocabularies D's vocabularies extend; None when there is none (vocabularies start empty)."""
    if not prepared_dir.is_dir():
        return None
    best: tuple[dt.date, Path] | None = None
    for path in prepared_dir.glob("dt=*"):
        try:
            when = parse_day(path.name[3:])
        except ValueError:
            continue
        if when >= day or not is_complete(path):
            continue
        try:
            version = read_manifest(path).get("schema_version")
        except (OSError, ValueError):
            log.warning("prepared partition %s has an unreadable manifest; not used as vocabulary base", path.name)
            continue
        if version != schema_version:
            continue
        if best is None or when > best[0]:
            best = (when, path)
    return best[1] if best else None


# --- writing ---------------------------------------------------------------------------------


def collect_spark_output(staging: Path, target: Path, schema: pa.Schema, single_file: bool) -> int:
    """Move the part files Spark wrote under ``staging`` to ``target``; returns their row count.

    single_file: ``target`` is a file (``users.parquet``); else a directory of
    ``part-00000.parquet``, ``part-00001.parquet``, ... in Spark's partition order (Spark's
    names carry a random job id; fixed names make re-runs identical). Checks each file's schema
    against the contract, writes an empty file with the schema when Spark wrote none, and removes
    the staging directory (Spark's checksum and marker files with it).
    """
    parts = sorted(p for p in staging.glob("part-*.parquet"))
    if single_file and len(parts) > 1:
        raise PrepareError(f"expected one file for {target.name}, Spark wrote {len(parts)}")
    if not single_file:
        target.mkdir(parents=True, exist_ok=False)
    rows = 0
    if not parts:
        dest = target if single_file else target / "part-00000.parquet"
        pq.write_table(schema.empty_table(), dest)
    for n, part in enumerate(parts):
        found = pq.read_schema(part)
        if not found.equals(schema, check_metadata=False):
            raise PrepareError(f"{target.name}: written schema {found} does not match the contract {schema}")
        rows += pq.read_metadata(part).num_rows
        part.rename(target if single_file else target / f"part-{n:05d}.parquet")
    shutil.rmtree(staging)
    return rows


def commit_partition(target: Path, fill: Callable[[Path], None]) -> Path:
    """Build a partition in a hidden sibling directory, mark it complete, swap it into ``target``.

    ``fill(tmp)`` writes every file except the success marker. The marker is written last, and
    an existing ``target`` is moved aside only once the new partition is complete; the old one
    is deleted after the swap. On any failure the temporary directory is removed and ``target``
    is left as it was. (Between the two renames ``target`` is briefly absent, never half written.)
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{uuid.uuid4().hex}.tmp"
    tmp.mkdir()
    old = None
    try:
        fill(tmp)
        (tmp / SUCCESS_MARKER).write_text("")
        if target.exists():
            old = target.parent / f".{target.name}.{uuid.uuid4().hex}.old"
            target.rename(old)
        tmp.rename(target)
    except BaseException:
        if old is not None and not target.exists():
            old.rename(target)  # the swap itself failed: put the previous partition back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target

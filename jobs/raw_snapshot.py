"""A fixed view of the raw window for one prepare run: hard links made under each day's lock.

Writers change raw while the nightly reads it. The archiver lands a day's events by renaming new
hour files over the old ones, and the ingest (backfill) swaps whole day directories; both hold
the day's lock (twotower.atomic.dir_lock) while they do. A reader that opens a file by path more
than once can see two versions of it. Spark checks the files on the driver, then its tasks open
them again; ``pq.read_table`` inspects a file, then scans it. So a file replaced in between gives
the old footer with the new pages, or is gone. The run then fails, or reads a day that is part
old and part new.

So prepare reads links. For each day of its window, with the day's lock taken shared, every
Parquet file of the day is hard-linked into ``raw/.read-<id>/dt=D/``. Writers wait only while
the links are made: a link is one directory entry, no copy. A link keeps the file as it was when
the link was made, whatever is later renamed over the original path or deleted. The attribute
tables are linked too. The snapshot is deleted when the run ends. A snapshot left by a killed
run is deleted by the next one: each run holds a lock on ``.read-<id>.lock`` while it lives, and
the kernel frees it when the process dies.

Where links cannot be made (a file system without hard links, a read-only raw mount), the run
reads raw in place and logs a warning that a file replaced during the read can fail it.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import logging
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from jobs.prepare_io import visible_parquet_files
from twotower.atomic import dir_lock
from twotower.contracts import raw_partition

log = logging.getLogger(__name__)

PREFIX = ".read-"
"""Name prefix of snapshot directories and their lock files in raw/ (hidden: no reader lists them)."""
ATTR_TABLES = ("users.parquet", "items.parquet")


@contextmanager
def raw_snapshot(raw_dir: Path, days: Iterable[dt.date]) -> Iterator[Path]:
    """A directory laid out like ``raw_dir`` for ``days`` (their existing ``dt=D`` partitions and
    the attribute tables), fixed for as long as the ``with`` lasts, then deleted; ``raw_dir``
    itself when links cannot be made (see the module docstring)."""
    if not raw_dir.is_dir():
        yield raw_dir  # nothing to read: the caller says so in its own words
        return
    sweep_stale(raw_dir)
    made = _make(raw_dir, list(days))
    if made is None:
        yield raw_dir
        return
    root, lock = made
    try:
        yield root
    finally:
        _remove(root, lock)


def _make(raw_dir: Path, days: list[dt.date]) -> tuple[Path, IO[str]] | None:
    """(snapshot root, its held lock file), or None after a warning when links cannot be made."""
    root, lock = None, None
    try:
        root, lock = _claim(raw_dir)
        files = link_days(raw_dir, root, days)
        log.info("reading a snapshot of raw: %d files of %d days linked into %s", files, len(days), root.name)
        return root, lock
    except OSError as exc:
        if root is not None and lock is not None:
            _remove(root, lock)
        log.warning(
            "cannot link a snapshot of the raw window under %s (%s); reading raw in place: "
            "a raw file replaced while it is read (an archiver landing) can fail this run", raw_dir, exc,
        )  # fmt: skip
        return None


def _claim(raw_dir: Path) -> tuple[Path, IO[str]]:
    """A new snapshot directory and its lock file, locked. The lock is checked to be on the file
    at the path after it is taken: a sweeper that deleted the file in between (taking the new,
    still unlocked file for a dead run's) would otherwise leave the lock guarding nothing."""
    while True:
        name = f"{PREFIX}{uuid.uuid4().hex}"
        handle = open(raw_dir / f"{name}.lock", "a")
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            same = os.stat(raw_dir / f"{name}.lock").st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            root = raw_dir / name
            root.mkdir()
            return root, handle
        handle.close()


def link_days(raw_dir: Path, root: Path, days: list[dt.date]) -> int:
    """Hard-link the visible Parquet files of each existing day partition of ``days`` into
    ``root/dt=D/`` (each day under its lock, shared) and the attribute tables into ``root``;
    returns the number of day files linked. OSError when a link cannot be made."""
    n = 0
    for day in days:
        part = raw_partition(raw_dir, day)
        if not part.is_dir():
            continue  # no lock file made for a day that does not exist
        with dir_lock(part, shared=True):
            for path in visible_parquet_files(part) if part.is_dir() else []:
                dest = root / part.name / path.relative_to(part)
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.link(path, dest)
                n += 1
    for name in ATTR_TABLES:
        try:
            os.link(raw_dir / name, root / name)  # replaced by a rename (jobs.ingest): one version
        except FileNotFoundError:
            pass  # no attribute table: the job runs without attributes
    return n


def sweep_stale(raw_dir: Path) -> list[str]:
    """Delete the snapshots of runs that are gone (their lock is free); returns their names."""
    swept = []
    for lock_path in sorted(raw_dir.glob(f"{PREFIX}*.lock")):
        with open(lock_path, "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live run's
            root = lock_path.with_name(lock_path.name[: -len(".lock")])
            shutil.rmtree(root, ignore_errors=True)
            lock_path.unlink(missing_ok=True)
            swept.append(root.name)
    if swept:
        log.info("deleted %d raw snapshots left by runs that ended without cleaning up: %s", len(swept), ", ".join(swept))
    return swept


def _remove(root: Path, lock: IO[str]) -> None:
    """Delete a snapshot: its links first, then the lock file, then let the lock go."""
    shutil.rmtree(root, ignore_errors=True)
    Path(lock.name).unlink(missing_ok=True)
    lock.close()

"""Atomic directory writes: readers see the old directory or the new one, never half of one; and
the lock that writers of one directory take so that their read-modify-writes do not interleave."""

from __future__ import annotations

import fcntl
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Callable


@contextmanager
def dir_lock(target: Path, shared: bool = False) -> Iterator[None]:
    """Hold the write lock of directory ``target`` (which need not exist yet): exclusive for a
    writer, or ``shared`` for a reader that must see no write half done (jobs.raw_snapshot
    links a day's files under it).

    An advisory ``flock`` on ``.<name>.lock`` beside ``target``: beside, not inside, because
    ``atomic_write_dir`` swaps the directory itself; the leading dot keeps it out of every
    reader's listing (Spark and pyarrow skip hidden files, the project's readers list
    ``*.parquet`` and ``dt=*``). The kernel releases it when the process dies, so a killed writer
    never leaves a directory locked.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def atomic_write_dir(target: Path, fill: Callable[[Path], None]) -> None:
    """Call ``fill(tmp)`` on a fresh sibling directory, then rename it over ``target``.

    The old ``target`` (if any) is moved aside before the rename and deleted after it, so a
    failure inside ``fill`` leaves ``target`` untouched and removes the temporary directory.
    """
    tmp = target.parent / f".{target.name}.{uuid.uuid4().hex}.tmp"
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.{uuid.uuid4().hex}.old"
            target.rename(old)
        tmp.rename(target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

"""Atomic directory writes: readers see the old directory or the new one, never half of one."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Callable


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

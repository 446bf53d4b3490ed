"""Whether a day's raw events are there to be prepared. Standard library only: the Airflow DAG
files import it, and they must not pull in pyarrow or Spark at parse time."""

from __future__ import annotations

import datetime as dt
from pathlib import Path


def raw_day_ready(raw_dir: Path, day: dt.date) -> tuple[bool, str]:
    """Whether the raw events of ``day`` can be read, and why, in words.

    Ready when ``raw/dt=D`` holds Parquet files, or when a later day's partition exists: the
    source has moved past D, so D is closed even if it had no events (MovieLens has such days).
    Hidden directories (ingest's temporary ones) never count.
    """
    name = f"dt={day.isoformat()}"
    part = raw_dir / name
    files = sorted(part.glob("*.parquet")) if part.is_dir() else []
    if files:
        return True, f"raw partition {part} is there ({len(files)} file(s))"
    later = sorted(
        p.name for p in raw_dir.glob("dt=*") if p.is_dir() and p.name > name and any(p.glob("*.parquet"))
    ) if raw_dir.is_dir() else []
    if later:
        return True, f"no raw events for {day}, but the source has moved on ({later[0]} exists): the day is closed and empty"
    return False, f"waiting for raw partition {part}"

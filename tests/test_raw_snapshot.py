"""jobs.raw_snapshot: the prepare job's fixed view of raw, on the real file system."""

from __future__ import annotations

import datetime as dt
import fcntl
import logging
import os
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.ingest import write_attr_table, write_raw_events
from jobs.raw_snapshot import PREFIX, raw_snapshot, sweep_stale
from twotower.atomic import dir_lock
from twotower.contracts import RAW_EVENT_SCHEMA, day_start_ms

D1, D2, D3 = dt.date(2024, 3, 1), dt.date(2024, 3, 2), dt.date(2024, 3, 3)


def events(day: dt.date, ids: list[str]) -> pa.Table:
    rows = [
        {"event_id": i, "user_id": "u1", "item_id": "i1", "event_type": "click", "ts": day_start_ms(day) + 3_600_000 * k, "weight": 1.0, "hour": k}
        for k, i in enumerate(ids)
    ]
    return pa.Table.from_pylist(rows, schema=RAW_EVENT_SCHEMA)


def ids_in(directory: Path) -> list[str]:
    return sorted(i for f in sorted(directory.rglob("*.parquet")) for i in pq.read_table(f).column("event_id").to_pylist())


def replace_by_rename(path: Path, table: pa.Table) -> None:
    """What an archiver landing does to an hour file."""
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    raw = tmp_path / "raw"
    for day, ids in ((D1, ["a1", "a2"]), (D2, ["b1"]), (D3, ["c1"])):
        write_raw_events(events(day, ids), raw)
    write_attr_table({"u1": ["age:30"]}, "users", raw)
    return raw


def leftovers(raw: Path) -> list[str]:
    return sorted(p.name for p in raw.iterdir() if p.name.startswith(PREFIX))


def test_the_snapshot_holds_the_window_as_it_was_whatever_is_written_meanwhile(raw: Path):
    with raw_snapshot(raw, [D1, D2, dt.date(2024, 2, 28)]) as view:
        assert view != raw and view.parent == raw and view.name.startswith(PREFIX)
        assert sorted(p.name for p in view.iterdir()) == ["dt=2024-03-01", "dt=2024-03-02", "users.parquet"]
        replace_by_rename(raw / "dt=2024-03-01" / "part-0.parquet", events(D1, ["a1", "a2", "a3"]))
        write_raw_events(events(D2, ["b9"]), raw)  # a backfill swaps the whole day directory
        write_attr_table({"u2": []}, "users", raw)
        assert ids_in(view / "dt=2024-03-01") == ["a1", "a2"]
        assert ids_in(view / "dt=2024-03-02") == ["b1"]
        assert pq.read_table(view / "users.parquet").column("user_id").to_pylist() == ["u1"]
    assert ids_in(raw / "dt=2024-03-01") == ["a1", "a2", "a3"] and ids_in(raw / "dt=2024-03-02") == ["b9"]
    assert leftovers(raw) == []
    assert not (raw / ".dt=2024-02-28.lock").exists(), "no lock file for a day that does not exist"


def test_the_snapshot_is_deleted_when_the_run_fails(raw: Path):
    with pytest.raises(RuntimeError, match="spark died"):
        with raw_snapshot(raw, [D1]):
            raise RuntimeError("spark died")
    assert leftovers(raw) == []
    assert ids_in(raw / "dt=2024-03-01") == ["a1", "a2"]


def test_a_landing_in_progress_is_waited_for(raw: Path):
    """The links of a day are made under its lock taken shared: a writer holding it (an archiver
    between reading the day and renaming its new files in) finishes first."""
    hour_file = raw / "dt=2024-03-01" / "part-0.parquet"
    locked, seen = threading.Event(), {}

    def landing() -> None:
        with dir_lock(raw / "dt=2024-03-01"):
            locked.set()
            time.sleep(0.5)  # mid-landing
            replace_by_rename(hour_file, events(D1, ["a1", "a2", "a3"]))

    writer = threading.Thread(target=landing)
    writer.start()
    locked.wait(5)
    with raw_snapshot(raw, [D1]) as view:
        seen["ids"] = ids_in(view / "dt=2024-03-01")
    writer.join()
    assert seen["ids"] == ["a1", "a2", "a3"]


def test_snapshots_of_runs_that_are_gone_are_swept_and_live_ones_kept(raw: Path, caplog):
    dead, live = raw / f"{PREFIX}dead", raw / f"{PREFIX}live"
    for root in (dead, live):
        (root / "dt=2024-03-01").mkdir(parents=True)
        os.link(raw / "dt=2024-03-01" / "part-0.parquet", root / "dt=2024-03-01" / "part-0.parquet")
        (raw / f"{root.name}.lock").touch()
    with open(raw / f"{live.name}.lock", "a") as held:  # a run still reading (another open file: flock conflicts)
        fcntl.flock(held, fcntl.LOCK_EX)
        with caplog.at_level(logging.INFO, logger="jobs.raw_snapshot"):
            with raw_snapshot(raw, [D1]) as view:
                assert leftovers(raw) == sorted([live.name, f"{live.name}.lock", view.name, f"{view.name}.lock"])
        assert f"{PREFIX}dead" in caplog.text
        assert sweep_stale(raw) == []
    assert sweep_stale(raw) == [live.name]
    assert leftovers(raw) == []


def test_without_hard_links_the_run_reads_raw_in_place_and_says_so(raw: Path, monkeypatch, caplog):
    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted", str(dst))

    monkeypatch.setattr(os, "link", no_links)
    with caplog.at_level(logging.WARNING, logger="jobs.raw_snapshot"):
        with raw_snapshot(raw, [D1, D2]) as view:
            assert view == raw
    assert "reading raw in place" in caplog.text and "Operation not permitted" in caplog.text
    assert leftovers(raw) == []

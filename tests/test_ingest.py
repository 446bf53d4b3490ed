"""Ingest: MovieLens and generic files into the raw event contract."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.ingest import (
    detect_ts_unit,
    ingest_file,
    ingest_movielens,
    movielens_item_attrs,
    movielens_user_attrs,
    normalise_events,
)
from jobs.synthetic import SyntheticSpec, generate
from twotower.contracts import RAW_EVENT_SCHEMA


def test_ts_unit_detection_boundary():
    assert detect_ts_unit(np.array([881250949.0])) == "s"  # MovieLens, 1997, seconds
    assert detect_ts_unit(np.array([881250949000.0])) == "ms"
    assert detect_ts_unit(np.array([99_999_999_999.0])) == "s"
    assert detect_ts_unit(np.array([100_000_000_000.0])) == "ms"


def test_movielens_attribute_tokens():
    uid, tokens = movielens_user_attrs("2|53|F|other|94043")
    assert uid == "2" and tokens == ["age=50-55", "gender=F", "occupation=other", "zip1=9"]
    iid, tokens = movielens_item_attrs(
        "1|Toy Story (1995)|01-Jan-1995||http://x|0|0|0|1|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0"
    )
    assert iid == "1" and tokens == ["genre=Animation", "genre=Children's", "genre=Comedy", "decade=1990s"]


def test_movielens_ingest_all_rows_by_day(ml_dir: Path, tmp_path: Path):
    report = ingest_movielens(ml_dir, tmp_path / "raw")
    assert report.rows_read == 100_000 and report.rows_written == 100_000 and report.skipped == {}
    assert report.ts_unit == "seconds"
    parts = sorted((tmp_path / "raw").glob("dt=*"))
    assert [p.name[3:] for p in parts] == report.days
    table = pa.concat_tables(pq.read_table(p, schema=RAW_EVENT_SCHEMA) for p in parts)
    assert table.num_rows == 100_000
    assert len(set(table["event_id"].to_pylist())) == 100_000
    assert table["ts"].to_numpy().min() == 874724710 * 1000
    first = (tmp_path / "raw" / f"dt={report.days[0]}")
    assert report.days[0] == "1997-09-20" and report.days[-1] == "1998-04-22" and first.is_dir()
    users = pq.read_table(tmp_path / "raw" / "users.parquet")
    items = pq.read_table(tmp_path / "raw" / "items.parquet")
    assert users.num_rows == 943 and items.num_rows == 1682


def test_ingest_is_idempotent(ml_small_raw_dir: Path, ml_dir: Path, tmp_path: Path):
    csv = tmp_path / "events.csv"
    csv.write_text("user_id,item_id,ts\nu1,i1,1700000000\nu1,i2,1700000060\nu2,i1,1700090000\n")
    ingest_file(csv, tmp_path / "raw")
    first = {p.name: pq.read_table(p).to_pylist() for p in (tmp_path / "raw").rglob("*.parquet")}
    ingest_file(csv, tmp_path / "raw")
    second = {p.name: pq.read_table(p).to_pylist() for p in (tmp_path / "raw").rglob("*.parquet")}
    assert first == second
    assert sorted(p.name for p in (tmp_path / "raw").iterdir() if p.name.startswith("dt=")) == [
        "dt=2023-11-14",
        "dt=2023-11-15",
    ]


def test_bad_rows_counted_with_reasons(tmp_path: Path):
    csv = tmp_path / "events.csv"
    csv.write_text(
        "user_id,item_id,ts,weight,event_type\n"
        "u1,i1,1700000000000,1.0,click\n"  # good, milliseconds
        ",i1,1700000000000,1.0,click\n"  # missing user
        "u1,,1700000000000,1.0,click\n"  # missing item
        "u1,i1,notatime,1.0,click\n"  # bad ts
        "u1,i1,99999999999999999,1.0,click\n"  # year > 2100
        "u1,i2,1700000000000,-2,click\n"  # negative weight
        "u2,i3,1700000001000,,view\n"  # missing weight -> 1.0
        "u1,i1,1700000000000,1.0,click\n"  # exact duplicate of row 1
    )
    report = ingest_file(csv, tmp_path / "raw")
    assert report.ts_unit == "milliseconds"
    assert report.rows_read == 8 and report.rows_written == 2
    assert report.skipped == {
        "missing user_id": 1,
        "missing item_id": 1,
        "missing or non-numeric ts": 1,
        "ts out of range (before 1970 or after 2100)": 1,
        "negative or non-finite weight": 1,
        "duplicate event_id": 1,
    }
    rows = pq.read_table(tmp_path / "raw" / "dt=2023-11-14").to_pylist()
    assert [(r["user_id"], r["item_id"], r["weight"], r["event_type"]) for r in rows] == [
        ("u1", "i1", 1.0, "click"),
        ("u2", "i3", 1.0, "view"),
    ]


def test_file_with_no_valid_rows_fails_clearly(tmp_path: Path):
    csv = tmp_path / "bad.csv"
    csv.write_text("user_id,item_id,ts\n,,\n,x,1\n")
    with pytest.raises(ValueError, match="no valid rows out of 2"):
        ingest_file(csv, tmp_path / "raw")
    assert not (tmp_path / "raw").exists() or not any((tmp_path / "raw").glob("dt=*"))


def test_missing_columns_named(tmp_path: Path):
    with pytest.raises(ValueError, match=r"missing required column\(s\) \['ts'\]"):
        normalise_events(pa.table({"user_id": ["a"], "item_id": ["b"]}), "x")


def test_parquet_input_and_failed_ingest_keeps_old_partition(tmp_path: Path):
    path = tmp_path / "events.parquet"
    pq.write_table(pa.table({"user_id": ["a", "b"], "item_id": ["x", "y"], "ts": [1_700_000_000, 1_700_000_100]}), path)
    ingest_file(path, tmp_path / "raw")
    before = pq.read_table(tmp_path / "raw" / "dt=2023-11-14").to_pylist()
    with pytest.raises(FileNotFoundError):
        ingest_file(tmp_path / "missing.parquet", tmp_path / "raw")
    assert pq.read_table(tmp_path / "raw" / "dt=2023-11-14").to_pylist() == before


def test_synthetic_generator_is_seeded_and_structured():
    spec = SyntheticSpec(n_users=300, n_items=200, n_events=5000, seed=3)
    a, ua, ia = generate(spec)
    b, _, _ = generate(spec)
    assert a.equals(b)
    assert a.num_rows == 5000 and len(ua) == 300 and len(ia) == 200
    ts = a["ts"].to_numpy()
    assert (np.diff(ts) >= 0).all()
    counts = np.bincount([int(i[1:]) for i in a["item_id"].to_pylist()], minlength=200)
    top10 = np.sort(counts)[::-1][:10].sum() / counts.sum()
    assert top10 > 0.15  # power-law: the 5% most popular items take far more than 5% of events

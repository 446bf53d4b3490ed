"""Prepare job, piece by piece: the driver-side table builders (pure Arrow), the file-system edges
(window, raw discovery, base partition, atomic commit) and each Spark transform on a few rows."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import prepare_vocab as pv
from jobs.prepare_io import (
    DayWindow,
    PrepareError,
    commit_partition,
    find_base_partition,
    find_raw_input,
)
from jobs.prepare_schema import PREPARED_SCHEMAS
from twotower.contracts import RAW_EVENT_SCHEMA, SUCCESS_MARKER, day_start_ms

DAY_MS = 86_400_000


# --- vocabularies and per-id tables (pure) -------------------------------------------------------


def vocab(name: str, pairs: list[tuple[str, int]]) -> pa.Table:
    key = pv.VOCAB_KEYS[name]
    return pa.table({key: [p[0] for p in pairs], "idx": pa.array([p[1] for p in pairs], pa.int32())})


def test_extend_vocab_keeps_base_and_appends_by_first_ts_then_catalog_by_id():
    base = vocab("vocab_users", [("b", 2), ("a", 1), ("z", 3)])
    seen = {"a": 50, "n2": 10, "n1": 10, "m": 5}  # "a" is known; n1/n2 tie on ts -> by id
    out = pv.extend_vocab(base, "vocab_users", seen, catalog=["c9", "c10", "m", "z", ""])
    assert out.schema.equals(PREPARED_SCHEMAS["vocab_users"])
    assert list(zip(out["user_id"].to_pylist(), out["idx"].to_pylist())) == [
        ("a", 1), ("b", 2), ("z", 3),  # base unchanged
        ("m", 4), ("n1", 5), ("n2", 6),  # new in the window, by (first ts, id)
        ("c10", 7), ("c9", 8),  # only in the attribute table, by id (string order)
    ]  # fmt: skip


def test_extend_vocab_continues_after_largest_base_index_and_starts_at_one():
    out = pv.extend_vocab(vocab("vocab_items", [("x", 7)]), "vocab_items", {"y": 1})
    assert out["idx"].to_pylist() == [7, 8]
    fresh = pv.extend_vocab(pv.empty_vocab("vocab_attrs"), "vocab_attrs", catalog={"genre=B", "genre=A"})
    assert fresh["token"].to_pylist() == ["genre=A", "genre=B"] and fresh["idx"].to_pylist() == [1, 2]


def test_extend_vocab_refuses_a_broken_base():
    with pytest.raises(ValueError, match="not a vocabulary"):
        pv.extend_vocab(vocab("vocab_users", [("a", 1), ("a", 2)]), "vocab_users", {})
    with pytest.raises(ValueError, match="not a vocabulary"):
        pv.extend_vocab(vocab("vocab_users", [("a", 0)]), "vocab_users", {})


def test_clean_attrs_drops_empty_tokens_and_merges_rows_deterministically():
    table = pa.table(
        {
            "user_id": ["u2", "u1", None, "u1", "u3"],
            "attrs": [["g=F", "", "g=F", "age=1"], ["b=2"], ["x=1"], ["a=1", None], None],
        }
    )
    reversed_rows = table.take(list(range(table.num_rows - 1, -1, -1)))
    out = pv.clean_attrs(table, "user_id")
    assert out == {"u2": ["g=F", "age=1"], "u1": ["a=1", "b=2"], "u3": []}
    assert pv.clean_attrs(reversed_rows, "user_id") == out


def test_entity_table_maps_tokens_in_order_and_gives_empty_lists():
    attr_vocab = vocab("vocab_attrs", [("genre=A", 1), ("genre=B", 2), ("decade=1990s", 3)])
    items = vocab("vocab_items", [("i2", 2), ("i1", 1), ("i3", 3)])
    out = pv.entity_table(items, {"i1": ["decade=1990s", "genre=A"], "i2": ["genre=B"]}, attr_vocab, "items")
    assert out.schema.equals(PREPARED_SCHEMAS["items"])
    assert out.to_pylist() == [
        {"item_idx": 1, "item_id": "i1", "attrs": [3, 1]},
        {"item_idx": 2, "item_id": "i2", "attrs": [2]},
        {"item_idx": 3, "item_id": "i3", "attrs": []},
    ]


def test_item_freq_covers_every_item_with_zero_for_unseen():
    items = vocab("vocab_items", [("a", 1), ("b", 2), ("c", 3)])
    out = pv.item_freq(items, {1: 3, 3: 1})
    assert out.schema.equals(PREPARED_SCHEMAS["item_freq"])
    assert out.to_pylist() == [
        {"item_idx": 1, "count": 3, "prob": 0.75},
        {"item_idx": 2, "count": 0, "prob": 0.0},
        {"item_idx": 3, "count": 1, "prob": 0.25},
    ]
    assert pv.item_freq(items, {})["prob"].to_pylist() == [0.0, 0.0, 0.0]


# --- window, raw discovery, base partition, commit ------------------------------------------------


def test_window_bounds_are_utc_midnights_of_w_days_ending_at_d():
    w = DayWindow(dt.date(1998, 4, 22), 3)
    assert w.first_day == dt.date(1998, 4, 20)
    assert w.dates() == [dt.date(1998, 4, 20), dt.date(1998, 4, 21), dt.date(1998, 4, 22)]
    assert w.start_ms == day_start_ms(dt.date(1998, 4, 20)) == 893_030_400_000
    assert w.cutoff_ms == day_start_ms(dt.date(1998, 4, 23)) == w.start_ms + 3 * DAY_MS


def write_day(raw: Path, day: str, rows: list[tuple[str, str, str, int]], name: str = "part-0.parquet") -> Path:
    part = raw / f"dt={day}"
    part.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "event_id": [r[0] for r in rows],
            "user_id": [r[1] for r in rows],
            "item_id": [r[2] for r in rows],
            "event_type": ["click"] * len(rows),
            "ts": pa.array([r[3] for r in rows], pa.int64()),
            "weight": pa.array([1.0] * len(rows), pa.float32()),
            "hour": pa.array([(r[3] // 3_600_000) % 24 for r in rows], pa.int32()),
        },
        schema=RAW_EVENT_SCHEMA,
    )
    pq.write_table(table, part / name)
    return part / name


def test_find_raw_input_reads_only_existing_partitions_inside_the_window(tmp_path: Path):
    raw = tmp_path / "raw"
    for day in ("1998-04-18", "1998-04-20", "1998-04-22", "1998-04-23"):
        ts = day_start_ms(dt.date.fromisoformat(day))
        write_day(raw, day, [(f"e-{day}-1", "u", "i", ts), (f"e-{day}-2", "u", "j", ts + 1)])
    (raw / "dt=1998-04-20" / ".part-9.parquet.tmp").write_bytes(b"half written by someone")  # hidden: ignored
    found = find_raw_input(raw, DayWindow(dt.date(1998, 4, 22), 4))  # 19..22
    assert found.partitions == ("dt=1998-04-20", "dt=1998-04-22")
    assert [f.parent.name for f in found.files] == ["dt=1998-04-20", "dt=1998-04-22"]
    assert found.n_rows == 4
    assert found.partition_named_in(f"could not read file:{raw.resolve()}/dt=1998-04-22/part-0.parquet") == "dt=1998-04-22"
    assert found.partition_named_in("some other failure") is None


def test_find_raw_input_fails_clearly_without_partitions_or_with_a_broken_one(tmp_path: Path):
    raw = tmp_path / "raw"
    write_day(raw, "1998-01-01", [("e1", "u", "i", day_start_ms(dt.date(1998, 1, 1)))])
    with pytest.raises(PrepareError, match=r"no raw partition in the window 1998-04-20\.\.1998-04-22 \(3 days\)"):
        find_raw_input(raw, DayWindow(dt.date(1998, 4, 22), 3))
    write_day(raw, "1998-04-21", [("e2", "u", "i", day_start_ms(dt.date(1998, 4, 21)))])
    (raw / "dt=1998-04-21" / "part-1.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(PrepareError, match=r"raw partition dt=1998-04-21 is unreadable: part-1\.parquet"):
        find_raw_input(raw, DayWindow(dt.date(1998, 4, 22), 3))
    (raw / "dt=1998-04-21" / "part-1.parquet").unlink()
    pq.write_table(pa.table({"user_id": ["u"], "item_id": ["i"]}), raw / "dt=1998-04-21" / "part-1.parquet")
    with pytest.raises(PrepareError, match=r"dt=1998-04-21: part-1\.parquet has no column 'event_id'"):
        find_raw_input(raw, DayWindow(dt.date(1998, 4, 22), 3))


def make_partition(prepared: Path, day: str, schema_version: int = 1, complete: bool = True) -> Path:
    part = prepared / f"dt={day}"
    part.mkdir(parents=True)
    (part / "manifest.json").write_text(json.dumps({"schema_version": schema_version}))
    if complete:
        (part / SUCCESS_MARKER).write_text("")
    return part


def test_base_partition_is_latest_complete_earlier_one_of_the_same_schema(tmp_path: Path):
    prepared = tmp_path / "prepared"
    assert find_base_partition(prepared, dt.date(1998, 4, 22), 1) is None  # no directory yet
    make_partition(prepared, "1998-04-01")
    make_partition(prepared, "1998-04-10")
    make_partition(prepared, "1998-04-15", schema_version=2)  # other layout
    make_partition(prepared, "1998-04-20", complete=False)  # crashed run
    make_partition(prepared, "1998-04-22")  # D itself is never its own base
    make_partition(prepared, "1998-04-25")  # later than D
    (prepared / ".dt=1998-04-21.abc.tmp").mkdir()
    assert find_base_partition(prepared, dt.date(1998, 4, 22), 1).name == "dt=1998-04-10"
    assert find_base_partition(prepared, dt.date(1998, 4, 22), 2).name == "dt=1998-04-15"
    assert find_base_partition(prepared, dt.date(1998, 4, 1), 1) is None


def test_commit_partition_swaps_in_only_a_complete_partition(tmp_path: Path):
    target = tmp_path / "prepared" / "dt=1998-04-22"

    def fill(text):
        def write(tmp: Path) -> None:
            assert not (tmp / SUCCESS_MARKER).exists()  # the marker comes after every file
            (tmp / "data.txt").write_text(text)

        return write

    assert commit_partition(target, fill("v1")) == target
    assert (target / "data.txt").read_text() == "v1" and (target / SUCCESS_MARKER).exists()

    def broken(tmp: Path) -> None:
        (tmp / "data.txt").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        commit_partition(target, broken)
    assert (target / "data.txt").read_text() == "v1"
    assert sorted(p.name for p in target.parent.iterdir()) == ["dt=1998-04-22"]  # no temp dir left

    commit_partition(target, fill("v2"))
    assert (target / "data.txt").read_text() == "v2"
    assert sorted(p.name for p in target.parent.iterdir()) == ["dt=1998-04-22"]  # old one removed


# --- Spark transforms on a few rows ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tf():
    from jobs import prepare_transform

    return prepare_transform


def events_df(spark, rows):
    """rows: (event_id, user_id, item_id, ts[, weight])."""
    full = [(r[0], r[1], r[2], "click", r[3], r[4] if len(r) > 4 else None) for r in rows]
    from jobs.prepare_transform import RAW_READ_SCHEMA

    return spark.createDataFrame(full, RAW_READ_SCHEMA)


def test_window_events_keeps_half_open_interval_and_defaults_weight(spark, tf):
    df = events_df(spark, [("a", "u", "i", 99), ("b", "u", "i", 100), ("c", "u", "i", 199, 2.5), ("d", "u", "i", 200)])
    out = {r["event_id"]: r["weight"] for r in tf.window_events(df, 100, 200).collect()}
    assert out == {"b": 1.0, "c": 2.5}


def test_dedup_keeps_the_earliest_copy_whatever_the_input_order(spark, tf):
    rows = [("e1", "u1", "i9", 20), ("e1", "u1", "i1", 10), ("e1", "u1", "i0", 10), ("e2", "u2", "i2", 5), ("e2", "u2", "i2", 5)]
    for order in (rows, rows[::-1]):
        out = sorted(tuple(r) for r in tf.dedup_events(events_df(spark, order)).select("event_id", "item_id", "ts").collect())
        assert out == [("e1", "i0", 10), ("e2", "i2", 5)]


def test_first_seen_per_user_and_item(spark, tf):
    df = events_df(spark, [("a", "u1", "i1", 30), ("b", "u1", "i2", 10), ("c", "u2", "i1", 20)])
    out = sorted(tuple(r) for r in tf.first_seen(df).collect())
    assert out == [("item", "i1", 20), ("item", "i2", 10), ("user", "u1", 10), ("user", "u2", 20)]


@pytest.fixture(scope="module")
def tiny_examples(spark, tf):
    """u1: five events, two pairs tied on ts (ordered by item id: shorter first, then as a string,
    then event_id);
    u2: one event. history_len 2."""
    rows = [
        ("e5", "u1", "i5", 300),
        ("e1", "u1", "i1", 100),
        ("e3", "u1", "i10", 200),  # ts tie with e2: "i2" comes first (shorter id: numeric order)
        ("e2", "u1", "i2", 200),
        ("e4b", "u1", "i4", 250),  # same ts and item as e4a: event_id decides
        ("e4a", "u1", "i4", 250),
        ("s1", "u2", "i1", 150),
    ]
    users = spark.createDataFrame([("u1", 1), ("u2", 2)], "user_id string, idx int")
    items = spark.createDataFrame([(f"i{k}", k) for k in (1, 2, 4, 5, 10)], "item_id string, idx int")
    indexed = tf.index_events(events_df(spark, rows), users, items)
    return tf.build_examples(indexed, history_len=2).cache()


def test_examples_history_is_strictly_before_in_event_order(tiny_examples):
    got = {r["event_id"]: (r["pos"], r["hist"], r["is_eval"]) for r in tiny_examples.collect()}
    # u1 order: e1(i1) e2(i2) e3(i10) e4a(i4) e4b(i4) e5(i5)
    assert got == {
        "e1": (1, [], False),
        "e2": (2, [1], False),
        "e3": (3, [1, 2], False),
        "e4a": (4, [2, 10], False),
        "e4b": (5, [10, 4], False),
        "e5": (6, [4, 4], True),
        "s1": (1, [], False),  # a user's only event stays in train
    }


def test_splits_item_counts_and_histories(tiny_examples, tf):
    assert [r["event_id"] for r in tf.eval_split(tiny_examples).collect()] == ["e5"]
    assert tf.train_split(tiny_examples).count() == 6
    counts = {(r["is_eval"], r["item_idx"]): r["count"] for r in tf.split_item_counts(tiny_examples).collect()}
    assert counts == {(False, 1): 2, (False, 10): 1, (False, 2): 1, (False, 4): 2, (True, 5): 1}
    hist = {r["user_idx"]: (r["hist"], r["hist_ts"], r["hist_event_ids"]) for r in tf.user_histories(tiny_examples, 2).collect()}
    assert hist == {1: ([4, 5], [250, 300], ["e4b", "e5"]), 2: ([1], [150], ["s1"])}


def test_conform_gives_the_contract_schema_with_nullable_fields(tiny_examples, tf, tmp_path: Path):
    from jobs.prepare import spark_path

    out = tf.conform(tiny_examples.repartition(1).sortWithinPartitions("user_idx", "pos"), PREPARED_SCHEMAS["train"])
    out.write.parquet(spark_path(tmp_path / "x"))
    files = sorted((tmp_path / "x").glob("part-*.parquet"))
    assert len(files) == 1  # the empty side of the union adds no file
    table = pq.read_table(files[0])
    assert table.schema.equals(PREPARED_SCHEMAS["train"], check_metadata=False)
    assert table["item_idx"].to_pylist() == [1, 2, 10, 4, 4, 5, 1]  # sort order survives

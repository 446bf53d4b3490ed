"""The Spark prepare job end to end on real Spark and MovieLens-derived raw data.

Every expected value is recomputed here in plain Python from the raw Parquet (an independent
reference of the window, dedup, per-user order, history, split and vocabulary rules), never
hard-coded.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.ingest import movielens_item_attrs, movielens_user_attrs, write_attr_table, write_raw_events
from jobs.prepare import run_prepare
from jobs.prepare_io import DayWindow, PrepareError
from jobs.prepare_schema import PREPARED_SCHEMAS
from twotower.config import Settings, load_settings
from twotower.contracts import MANIFEST_KEYS, RAW_EVENT_SCHEMA, SUCCESS_MARKER, day_start_ms

pytestmark = pytest.mark.spark

FULL_DAY = dt.date(1998, 4, 22)  # last day of MovieLens-100K
D1, D2, SHORT_W = dt.date(1997, 11, 15), dt.date(1998, 1, 31), 45
L = 10
SOLO_TS = day_start_ms(dt.date(1998, 1, 15)) + 12 * 3_600_000


# --- raw data for these tests -------------------------------------------------------------------


def read_raw_rows(raw: Path) -> list[dict]:
    """Every row of every raw day partition, as stored."""
    files = sorted(raw.glob("dt=*/*.parquet"))
    return pa.concat_tables(pq.read_table(f, schema=RAW_EVENT_SCHEMA) for f in files).to_pylist()


@pytest.fixture(scope="module")
def custom_raw(ml_small_raw_dir: Path, ml_dir: Path, tmp_path_factory) -> Path:
    """Users 1..120 of MovieLens-100K, plus what a real archive holds:
    * duplicates of 3 events in a second file of one day: two exact copies and one copy with
      another item (dedup must keep the original, the earliest by (ts, user, item, ...));
    * a user ("solo") with a single event;
    * attribute tables that do not cover everything: users 1..60 and items 1..1000 or even
      (so that items no user of the slice rated exist, and so do rated items without attributes).
    """
    raw = tmp_path_factory.mktemp("prep_raw") / "raw"
    rows = read_raw_rows(ml_small_raw_dir)
    solo = dict(rows[0], event_id="solo-1", user_id="solo", item_id="50", ts=SOLO_TS, hour=12)
    write_raw_events(pa.Table.from_pylist(rows + [solo], schema=RAW_EVENT_SCHEMA), raw)
    day = "1997-12-01"
    same_day = [r for r in rows if r["ts"] // 86_400_000 == day_start_ms(dt.date.fromisoformat(day)) // 86_400_000]
    dups = [same_day[0], same_day[1], dict(same_day[2], item_id="zz-dup")]
    pq.write_table(pa.Table.from_pylist(dups, schema=RAW_EVENT_SCHEMA), raw / f"dt={day}" / "part-1.parquet")
    users = dict(movielens_user_attrs(x) for x in (ml_dir / "u.user").read_text(encoding="latin-1").splitlines() if x)
    items = dict(movielens_item_attrs(x) for x in (ml_dir / "u.item").read_text(encoding="latin-1").splitlines() if x)
    write_attr_table({u: a for u, a in users.items() if int(u) <= 60}, "users", raw)
    write_attr_table({i: a for i, a in items.items() if keep_item_attrs(i)}, "items", raw)
    return raw


def keep_item_attrs(item_id: str) -> bool:
    return int(item_id) <= 1000 or int(item_id) % 2 == 0


def settings_for(root: Path, raw: Path, window_days: int, history_len: int = L) -> Settings:
    """Settings with a private state dir whose raw/ is ``raw`` (a link; raw data is read-only)."""
    state = root / "state"
    state.mkdir(parents=True)
    (state / "raw").symlink_to(raw, target_is_directory=True)
    s = load_settings().replace("paths", state_dir=state)
    return s.replace("prepare", window_days=window_days, history_len=history_len)


# --- the reference, in plain Python ----------------------------------------------------------------


def reference_events(raw: Path, window: DayWindow) -> list[dict]:
    """Window filter, then one row per event_id: the smallest (ts, user, item, type, weight)."""
    best: dict[str, dict] = {}
    for r in read_raw_rows(raw):
        if not window.start_ms <= r["ts"] < window.cutoff_ms:
            continue
        key = (r["ts"], r["user_id"], r["item_id"], r["event_type"], r["weight"])
        old = best.get(r["event_id"])
        if old is None or key < (old["ts"], old["user_id"], old["item_id"], old["event_type"], old["weight"]):
            best[r["event_id"]] = r
    return list(best.values())


def per_user(events: list[dict]) -> dict[str, list[dict]]:
    """Each user's events in the contract order (ts, len(item_id), item_id, event_id)."""
    out: dict[str, list[dict]] = {}
    for e in events:
        out.setdefault(e["user_id"], []).append(e)
    return {u: sorted(es, key=lambda e: (e["ts"], len(e["item_id"]), e["item_id"], e["event_id"])) for u, es in out.items()}


def first_seen_order(events: list[dict], key: str) -> list[str]:
    first: dict[str, int] = {}
    for e in events:
        first[e[key]] = min(first.get(e[key], e["ts"]), e["ts"])
    return [i for _, i in sorted((ts, i) for i, ts in first.items())]


@dataclass
class Prepared:
    settings: Settings
    path: Path
    window: DayWindow
    events: list[dict]  # reference events of the window

    def table(self, name: str) -> pa.Table:
        target = self.path / name if name in ("train", "eval") else self.path / f"{name}.parquet"
        return pq.read_table(target)

    def manifest(self) -> dict:
        return json.loads((self.path / "manifest.json").read_text())

    def idx(self, name: str) -> dict[str, int]:
        t = self.table(name)
        return dict(zip(t.column(0).to_pylist(), t["idx"].to_pylist()))


def prepare(spark, settings: Settings, day: dt.date, raw: Path) -> Prepared:
    path = run_prepare(settings, day, spark)
    window = DayWindow(day, settings.prepare.window_days)
    return Prepared(settings, path, window, reference_events(raw, window))


def file_snapshot(partition: Path) -> dict[str, bytes]:
    return {str(p.relative_to(partition)): p.read_bytes() for p in sorted(partition.rglob("*")) if p.is_file()}


# --- full window: layout, dedup, examples, split, per-id tables --------------------------------------


@pytest.fixture(scope="module")
def full(spark, custom_raw: Path, tmp_path_factory) -> Prepared:
    settings = settings_for(tmp_path_factory.mktemp("prep_full"), custom_raw, window_days=400)
    return prepare(spark, settings, FULL_DAY, custom_raw)


def test_layout_schemas_and_manifest_match_the_contract(full: Prepared):
    names = sorted(p.name for p in full.path.iterdir())
    assert names == sorted(
        [f"{n}.parquet" for n in PREPARED_SCHEMAS if n not in ("train", "eval")] + ["train", "eval", "manifest.json", SUCCESS_MARKER]
    )
    assert [p.name for p in (full.path / "train").iterdir()] == ["part-00000.parquet"]
    for name, schema in PREPARED_SCHEMAS.items():
        assert full.table(name).schema.equals(schema, check_metadata=False), name
    assert not [p for p in full.path.parent.iterdir() if p.name.startswith(".")]  # no temp dir left

    m = full.manifest()
    assert set(MANIFEST_KEYS) <= set(m)
    assert m["logical_date"] == "1998-04-22" and m["window_days"] == 400 and m["history_len"] == L
    assert m["window_start_ms"] == day_start_ms(dt.date(1997, 3, 19)) and m["data_cutoff_ms"] == day_start_ms(dt.date(1998, 4, 23))
    assert m["raw_partitions"] == sorted(p.name for p in full.settings.paths.raw_dir.glob("dt=*"))
    assert m["vocab_base"] is None and m["schema_version"] == 1
    counts = {n: full.table(n).num_rows for n in PREPARED_SCHEMAS}
    assert m["n_users"] == counts["vocab_users"] == counts["users"]
    assert m["n_items"] == counts["vocab_items"] == counts["items"] == counts["item_freq"]
    assert m["n_attrs"] == counts["vocab_attrs"]
    assert m["n_train"] == counts["train"] and m["n_eval"] == counts["eval"]
    assert m["n_events"] == m["n_train"] + m["n_eval"] == len(full.events)


def test_duplicates_are_dropped_and_the_earliest_copy_kept(full: Prepared):
    raw_rows = read_raw_rows(full.settings.paths.raw_dir)
    assert len(raw_rows) == len(full.events) + 3  # the three injected copies
    assert full.manifest()["n_raw_rows"] == len(raw_rows)
    assert "zz-dup" not in full.idx("vocab_items")  # the differing copy lost to the original


def test_every_history_is_exactly_the_last_l_earlier_events(full: Prepared):
    users, items = full.idx("vocab_users"), full.idx("vocab_items")
    expected = set()
    for user, events in per_user(full.events).items():
        for k, e in enumerate(events):
            hist = tuple(items[x["item_id"]] for x in events[max(0, k - L) : k])  # strictly before k
            expected.add((users[user], items[e["item_id"]], e["ts"], hist))
    got = set()
    for split in ("train", "eval"):
        for r in full.table(split).to_pylist():
            got.add((r["user_idx"], r["item_idx"], r["ts"], tuple(r["hist"])))
    assert len(got) == len(full.events) and got == expected


def test_spot_check_user_1_by_hand(full: Prepared):
    """User 1's events written out by hand: history = previous L items, oldest first; on a ts tie
    the item id decides (numeric order for numeric ids), so a tied item is history of the other."""
    items = full.idx("vocab_items")
    mine = [
        (ts, item, eid)
        for ts, _, item, eid in sorted((e["ts"], len(e["item_id"]), e["item_id"], e["event_id"]) for e in full.events if e["user_id"] == "1")
    ]
    user_1 = full.idx("vocab_users")["1"]
    rows = [r for r in full.table("train").to_pylist() if r["user_idx"] == user_1]
    assert [r["ts"] for r in rows] == [ts for ts, _, _ in mine[:-1]]  # file order = event order
    assert rows[0]["hist"] == []
    assert rows[1]["hist"] == [items[mine[0][1]]]
    assert rows[L + 3]["hist"] == [items[i] for _, i, _ in mine[3 : L + 3]]
    tie = next(k for k in range(1, len(mine) - 1) if mine[k][0] == mine[k - 1][0])
    assert rows[tie]["hist"][-1] == items[mine[tie - 1][1]]  # the tied event ordered first is history
    assert rows[tie - 1]["hist"] == [items[i] for _, i, _ in mine[max(0, tie - 1 - L) : tie - 1]]  # not the other way


def test_eval_is_each_users_last_event_and_single_event_users_stay_in_train(full: Prepared):
    users, items = full.idx("vocab_users"), full.idx("vocab_items")
    order = per_user(full.events)
    evals = full.table("eval").to_pylist()
    assert Counter(r["user_idx"] for r in evals) == Counter(users[u] for u, es in order.items() if len(es) >= 2)
    for r in evals:
        user = next(u for u, i in users.items() if i == r["user_idx"])
        last = order[user][-1]
        assert (r["item_idx"], r["ts"]) == (items[last["item_id"]], last["ts"])
    solo = [r for r in full.table("train").to_pylist() if r["user_idx"] == users["solo"]]
    assert len(order["solo"]) == 1 and len(solo) == 1 and solo[0]["hist"] == [] and solo[0]["ts"] == SOLO_TS
    assert users["solo"] not in {r["user_idx"] for r in evals}


def test_vocabularies_of_a_first_run(full: Prepared):
    users = full.table("vocab_users")
    assert users["idx"].to_pylist() == list(range(1, users.num_rows + 1))
    assert users["user_id"].to_pylist() == first_seen_order(full.events, "user_id")  # attrs cover no extra user
    items = full.table("vocab_items")
    in_events = first_seen_order(full.events, "item_id")
    attr_only = sorted({str(i) for i in range(1, 1683) if keep_item_attrs(str(i))} - set(in_events))  # by id, as strings
    assert attr_only and items["item_id"].to_pylist() == in_events + attr_only
    assert items["idx"].to_pylist() == list(range(1, items.num_rows + 1))


def test_attribute_tables_and_item_frequencies(full: Prepared, custom_raw: Path):
    tokens = {i: t for t, i in full.idx("vocab_attrs").items()}
    raw_users = {r["user_id"]: r["attrs"] for r in pq.read_table(custom_raw / "users.parquet").to_pylist()}
    for r in full.table("users").to_pylist():
        assert [tokens[i] for i in r["attrs"]] == raw_users.get(r["user_id"], [])
    assert full.table("users").to_pylist()[0]["user_idx"] == 1
    raw_items = {r["item_id"]: r["attrs"] for r in pq.read_table(custom_raw / "items.parquet").to_pylist()}
    assert [[tokens[i] for i in r["attrs"]] for r in full.table("items").to_pylist()] == [
        raw_items.get(i, []) for i in full.table("vocab_items")["item_id"].to_pylist()
    ]

    train_items = Counter(r["item_idx"] for r in full.table("train").to_pylist())
    freq = full.table("item_freq").to_pylist()
    assert [r["item_idx"] for r in freq] == list(range(1, len(freq) + 1))
    assert {r["item_idx"]: r["count"] for r in freq if r["count"]} == dict(train_items)
    total = sum(train_items.values())
    assert all(r["prob"] == r["count"] / total for r in freq)
    assert any(r["count"] == 0 and r["prob"] == 0.0 for r in freq)  # attribute-only items


def test_user_history_is_the_last_l_events_at_the_cutoff(full: Prepared):
    users, items = full.idx("vocab_users"), full.idx("vocab_items")
    expected = {}
    for user, events in per_user(full.events).items():
        last = events[-L:]
        expected[users[user]] = ([items[e["item_id"]] for e in last], [e["ts"] for e in last], [e["event_id"] for e in last])
    rows = full.table("user_history").to_pylist()
    assert [r["user_idx"] for r in rows] == sorted(expected)
    assert {r["user_idx"]: (r["hist"], r["hist_ts"], r["hist_event_ids"]) for r in rows} == expected


# --- two dates: the window rule, stable vocabularies, idempotence ----------------------------------


@pytest.fixture(scope="module")
def two_dates(spark, custom_raw: Path, tmp_path_factory):
    settings = settings_for(tmp_path_factory.mktemp("prep_two"), custom_raw, window_days=SHORT_W)
    first = prepare(spark, settings, D1, custom_raw)
    second = prepare(spark, settings, D2, custom_raw)
    return first, second


def test_window_keeps_only_events_of_its_days(two_dates, custom_raw: Path):
    first, _ = two_dates
    in_window = [p.name for p in sorted(custom_raw.glob("dt=*")) if first.window.first_day.isoformat() <= p.name[3:] <= "1997-11-15"]
    m = first.manifest()
    assert m["raw_partitions"] == in_window and m["window_start_ms"] == day_start_ms(dt.date(1997, 10, 2))
    all_events = {r["event_id"] for r in read_raw_rows(custom_raw)}
    assert m["n_events"] == len(first.events) and 0 < len(first.events) < len(all_events)
    ts = [r["ts"] for s in ("train", "eval") for r in first.table(s).to_pylist()]
    assert first.window.start_ms <= min(ts) and max(ts) < first.window.cutoff_ms
    # the vocabularies hold the window's ids and the attribute tables' ids, nothing from other days
    attr_users = set(pq.read_table(custom_raw / "users.parquet")["user_id"].to_pylist())
    attr_items = set(pq.read_table(custom_raw / "items.parquet")["item_id"].to_pylist())
    assert set(first.idx("vocab_users")) == {e["user_id"] for e in first.events} | attr_users
    assert set(first.idx("vocab_items")) == {e["item_id"] for e in first.events} | attr_items
    assert {e["user_id"] for e in read_raw_rows(custom_raw)} - set(first.idx("vocab_users"))  # some are left out


def test_vocabularies_are_stable_across_dates(two_dates):
    first, second = two_dates
    assert second.manifest()["vocab_base"] == f"dt={D1.isoformat()}"
    for name, key in (("vocab_users", "user_id"), ("vocab_items", "item_id"), ("vocab_attrs", "token")):
        old, new = first.idx(name), second.idx(name)
        assert {k: new[k] for k in old} == old, name  # every id keeps its index
        appended = [k for k, _ in sorted(new.items(), key=lambda kv: kv[1]) if k not in old]
        assert sorted(new[k] for k in appended) == list(range(len(old) + 1, len(new) + 1))
        if key == "token":
            continue
        in_window = first_seen_order(second.events, key)
        new_seen = [k for k in in_window if k not in old]
        assert new_seen, f"the second window must bring new {key}s for this test to mean anything"
        assert appended[: len(new_seen)] == new_seen  # by (first ts in D2's window, id)
        assert appended[len(new_seen) :] == sorted(set(appended) - set(new_seen))  # attribute-only, by id
    gone = set(first.idx("vocab_users")) - {e["user_id"] for e in second.events}
    assert gone  # users absent from D2's window keep their rows too (checked above)


def test_rerunning_a_date_gives_identical_files(spark, two_dates, custom_raw: Path):
    _, second = two_dates
    before = file_snapshot(second.path)
    again = prepare(spark, second.settings, D2, custom_raw)
    assert again.path == second.path
    after = file_snapshot(second.path)
    assert sorted(after) == sorted(before)
    for name in before:
        assert after[name] == before[name], name
    assert not [p for p in second.path.parent.iterdir() if p.name.startswith(".")]


# --- failures ---------------------------------------------------------------------------------


def corrupt_pages(path: Path) -> None:
    """Overwrite a Parquet file's data pages with garbage, keeping its footer readable."""
    data = bytearray(path.read_bytes())
    footer_len = int.from_bytes(data[-8:-4], "little")
    for k in range(4, len(data) - 8 - footer_len):
        data[k] = 0xFF
    path.write_bytes(bytes(data))


FAIL_DAY, FAIL_W = dt.date(1997, 12, 5), 5


@pytest.fixture(scope="module")
def good_state(spark, custom_raw: Path, tmp_path_factory) -> Path:
    """A state dir holding a good partition of FAIL_DAY (built once, copied per test)."""
    root = tmp_path_factory.mktemp("prep_good")
    settings = settings_for(root, custom_raw, window_days=FAIL_W).replace("prepare", rows_per_file=100)
    run_prepare(settings, FAIL_DAY, spark)
    return settings.paths.prepared_dir


def test_a_large_split_is_several_files_each_holding_whole_users(good_state: Path):
    part = good_state / f"dt={FAIL_DAY.isoformat()}"
    n_train = json.loads((part / "manifest.json").read_text())["n_train"]
    files = sorted((part / "train").iterdir())
    assert n_train > 300 and [f.name for f in files] == [f"part-{k:05d}.parquet" for k in range(len(files))]
    assert 2 <= len(files) <= -(-n_train // 100)  # ceil(n/100) hash buckets; an empty bucket writes no file
    seen_users: set[int] = set()
    total = 0
    for f in files:
        rows = pq.read_table(f).to_pylist()
        keys = [(r["user_idx"], r["ts"]) for r in rows]
        assert keys == sorted(keys)
        users = {r["user_idx"] for r in rows}
        assert not users & seen_users  # a user's examples live in one file
        seen_users |= users
        total += len(rows)
    assert total == n_train


@pytest.fixture
def failing_setup(custom_raw: Path, good_state: Path, tmp_path: Path):
    """A private copy of the raw data and of a good partition of FAIL_DAY (W = 5)."""
    raw = tmp_path / "raw-copy"
    shutil.copytree(custom_raw, raw)
    settings = settings_for(tmp_path, raw, window_days=FAIL_W).replace("prepare", rows_per_file=100)
    shutil.copytree(good_state, settings.paths.prepared_dir)
    good = settings.paths.prepared_dir / f"dt={FAIL_DAY.isoformat()}"
    return settings, FAIL_DAY, raw, good, file_snapshot(good)


def assert_untouched(good: Path, snapshot: dict[str, bytes]) -> None:
    assert file_snapshot(good) == snapshot
    assert sorted(p.name for p in good.parent.iterdir()) == [good.name]  # no temp or old dir


def test_unreadable_raw_file_fails_before_writing_and_names_its_partition(spark, failing_setup):
    settings, day, raw, good, snapshot = failing_setup
    (raw / "dt=1997-12-03" / "part-7.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(PrepareError, match=r"raw partition dt=1997-12-03 is unreadable: part-7\.parquet"):
        run_prepare(settings, day, spark)
    assert_untouched(good, snapshot)


def test_corrupt_data_pages_fail_inside_spark_and_keep_the_previous_partition(spark, failing_setup):
    settings, day, raw, good, snapshot = failing_setup
    corrupt_pages(raw / "dt=1997-12-04" / "part-0.parquet")
    with pytest.raises(PrepareError, match=r"raw partition dt=1997-12-04 could not be read; nothing was written"):
        run_prepare(settings, day, spark)
    assert_untouched(good, snapshot)


def test_failure_while_writing_keeps_the_previous_partition(spark, failing_setup, monkeypatch):
    """A crash after most tables are written (the last Spark write fails) leaves nothing behind."""
    import jobs.prepare as job

    settings, day, raw, good, snapshot = failing_setup
    real = job.write_spark

    def failing(df, tmp, name, *args, **kwargs):
        if name == "user_history":
            assert (tmp / "train" / "part-00000.parquet").exists()  # midway: the splits are written
            raise OSError("no space left on device")
        return real(df, tmp, name, *args, **kwargs)

    monkeypatch.setattr(job, "write_spark", failing)
    with pytest.raises(OSError, match="no space left"):
        run_prepare(settings, day, spark)
    assert_untouched(good, snapshot)


def test_a_landing_while_spark_reads_waits_for_the_next_run(spark, failing_setup, monkeypatch):
    """An archiver renames a new version of one of the window's files into place just as Spark
    starts reading (jobs.raw_snapshot). This run reads the day as it was when the run listed it;
    the next run reads the landing."""
    import os

    import jobs.prepare as job

    settings, day, raw, good, snapshot = failing_setup
    hour_file = raw / "dt=1997-12-04" / "part-0.parquet"
    before = pq.read_table(hour_file)
    intruder = pa.Table.from_pylist([dict(before.to_pylist()[0], event_id="landed-late", user_id="intruder")], schema=before.schema)
    real = job.extract

    def landing_then_extract(*args, **kwargs):
        tmp = hour_file.with_name(".landing.tmp")
        pq.write_table(pa.concat_tables([before, intruder]), tmp)
        os.replace(tmp, hour_file)
        return real(*args, **kwargs)

    def users_of(path: Path) -> set[str]:
        return set(pq.read_table(path / "vocab_users.parquet").column("user_id").to_pylist())

    monkeypatch.setattr(job, "extract", landing_then_extract)
    first = run_prepare(settings, day, spark)
    assert "intruder" not in users_of(first)
    assert json.loads((first / "manifest.json").read_text()) == json.loads(snapshot["manifest.json"])  # the run before the landing's
    monkeypatch.setattr(job, "extract", real)
    assert "intruder" in users_of(run_prepare(settings, day, spark))
    assert not [p.name for p in raw.iterdir() if p.name.startswith(".read-")]


def test_no_raw_partition_in_the_window_fails_clearly(spark, custom_raw: Path, tmp_path: Path):
    settings = settings_for(tmp_path, custom_raw, window_days=30)
    with pytest.raises(PrepareError, match=r"no raw partition in the window 1999-01-02\.\.1999-01-31 \(30 days\)"):
        run_prepare(settings, dt.date(1999, 1, 31), spark)
    assert not settings.paths.prepared_dir.exists() or not any(settings.paths.prepared_dir.iterdir())


# --- DESIGN §9 protocol on the whole of MovieLens-100K --------------------------------------------


def test_movielens_100k_leave_last_out_split(spark, ml_raw_dir: Path, ml_dir: Path, tmp_path: Path):
    settings = settings_for(tmp_path, ml_raw_dir, window_days=400, history_len=50)
    path = run_prepare(settings, FULL_DAY, spark)
    m = json.loads((path / "manifest.json").read_text())
    assert (m["n_events"], m["n_users"], m["n_items"], m["n_train"], m["n_eval"]) == (100_000, 943, 1682, 99_057, 943)
    last: dict[str, tuple[int, int]] = {}
    for line in (ml_dir / "u.data").read_text().splitlines():
        user, item, _, ts = line.split("\t")
        last[user] = max(last.get(user, (0, 0)), (int(ts) * 1000, int(item)))  # ties: item id numerically (DESIGN §9)
    users = {r["user_id"]: r["idx"] for r in pq.read_table(path / "vocab_users.parquet").to_pylist()}
    items = {r["item_id"]: r["idx"] for r in pq.read_table(path / "vocab_items.parquet").to_pylist()}
    got = {(r["user_idx"], r["item_idx"], r["ts"]) for r in pq.read_table(path / "eval").to_pylist()}
    assert got == {(users[u], items[str(i)], ts) for u, (ts, i) in last.items()}

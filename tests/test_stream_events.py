"""The Kafka message parser (streaming.events): every rejection class, the happy path, and a fuzz
that finds no crash."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings as hsettings, strategies as st

from streaming.events import (
    REASONS,
    Event,
    Limits,
    Rejection,
    check_item_known,
    dead_letter_headers,
    dead_letter_value,
    encode_event,
    parse_event,
)

TS = 1_709_251_200_000  # 2024-03-01T00:00Z
GOOD = {"event_id": "e1", "user_id": "u1", "item_id": "i1", "event_type": "click", "ts": TS, "weight": 2.5}


def body(**changes) -> bytes:
    obj = dict(GOOD)
    for k, v in changes.items():
        if v is ...:
            obj.pop(k)
        else:
            obj[k] = v
    return json.dumps(obj).encode()


def test_valid_event_parses_with_all_fields():
    ev = parse_event(body(), b"u1", TS)
    assert ev == Event("e1", "u1", "i1", "click", TS, 2.5)


def test_weight_defaults_to_one_and_extra_fields_are_ignored():
    ev = parse_event(body(weight=..., extra={"nested": [1, 2]}, page="home"), b"u1", TS)
    assert isinstance(ev, Event) and ev.weight == 1.0 and ev.ts == TS


def test_movielens_era_timestamps_are_accepted():
    ev = parse_event(body(ts=881_250_949_000), b"u1", 881_250_949_000)  # 1997-12-04
    assert isinstance(ev, Event) and ev.ts == 881_250_949_000


def test_integral_float_ts_is_accepted_as_int():
    ev = parse_event(body(ts=float(TS)), b"u1", TS)
    assert isinstance(ev, Event) and ev.ts == TS and isinstance(ev.ts, int)


CASES = [
    ("empty_payload", b"", b"u1", TS),
    ("payload_too_large", body(pad="x" * 70_000), b"u1", TS),
    ("not_utf8", b'{"event_id": "\xff\xfe"}', b"u1", TS),
    ("not_json", b'{"event_id": "e1", ', b"u1", TS),
    ("not_object", b'["e1", "u1"]', b"u1", TS),
    ("duplicate_field", b'{"event_id":"e1","user_id":"u1","user_id":"u2","item_id":"i1","event_type":"c","ts":1709251200000}', b"u1", TS),
    ("missing_field", body(item_id=...), b"u1", TS),
    ("missing_field", body(ts=None), b"u1", TS),
    ("wrong_type", body(user_id=42), b"42", TS),
    ("wrong_type", body(event_type=["click"]), b"u1", TS),
    ("empty_id", body(item_id="   "), b"u1", TS),
    ("id_too_long", body(event_id="e" * 300), b"u1", TS),
    ("id_bad_characters", body(item_id="i1\tmore"), b"u1", TS),
    ("id_bad_characters", body(user_id=" u1"), b" u1", TS),
    ("id_bad_characters", b'{"event_id":"e1","user_id":"u1","item_id":"\\ud800","event_type":"c","ts":1709251200000}', b"u1", TS),
    ("bad_ts", body(ts="1709251200000"), b"u1", TS),
    ("bad_ts", body(ts=1.5e12 + 0.5), b"u1", TS),
    ("bad_ts", body(ts=True), b"u1", TS),
    ("bad_ts", b'{"event_id":"e1","user_id":"u1","item_id":"i1","event_type":"c","ts":NaN}', b"u1", TS),
    ("ts_out_of_range", body(ts=1_709_251_200), b"u1", TS),  # epoch seconds
    ("ts_out_of_range", body(ts=631_151_999_999), b"u1", TS),  # just before 1990
    ("ts_out_of_range", body(ts=5_000_000_000_000), b"u1", None),
    ("ts_after_send_time", body(ts=TS + 2 * 3_600_000), b"u1", TS),
    ("bad_weight", body(weight=-0.1), b"u1", TS),
    ("bad_weight", body(weight="heavy"), b"u1", TS),
    ("bad_weight", b'{"event_id":"e1","user_id":"u1","item_id":"i1","event_type":"c","ts":1709251200000,"weight":Infinity}', b"u1", TS),
    ("bad_weight", body(weight=1e9), b"u1", TS),
    ("bad_event_type", body(event_type="add to cart!"), b"u1", TS),
    ("bad_event_type", body(event_type=""), b"u1", TS),
    ("bad_event_type", body(event_type="click\n"), b"u1", TS),  # "$" alone let a final newline through
    ("missing_key", body(), None, TS),
    ("key_mismatch", body(), b"u2", TS),
]


@pytest.mark.parametrize("code,value,key,record_ts", CASES)
def test_each_rejection_class(code, value, key, record_ts):
    got = parse_event(value, key, record_ts)
    assert isinstance(got, Rejection), got
    assert got.code == code, got
    assert got.code in REASONS and got.message


def test_at_least_twelve_distinct_classes_are_exercised():
    assert len({c for c, *_ in CASES}) >= 12
    assert len({c for c, *_ in CASES}) == len(REASONS) - 1  # all but unknown_item (a separate check)


def test_send_time_check_is_skipped_without_a_record_timestamp_and_tolerates_skew():
    assert isinstance(parse_event(body(ts=TS + 2 * 3_600_000), b"u1", None), Event)
    assert isinstance(parse_event(body(ts=TS + 2 * 3_600_000), b"u1", -1), Event)
    assert isinstance(parse_event(body(ts=TS + 3_599_000), b"u1", TS), Event)


def test_limits_are_configurable_and_key_can_be_optional():
    small = Limits(max_bytes=50)
    assert parse_event(body(), b"u1", TS, small).code == "payload_too_large"
    assert isinstance(parse_event(body(), None, TS, require_key=False), Event)


def test_unknown_item_is_a_separate_check():
    ev = parse_event(body(), b"u1", TS)
    assert check_item_known(ev, {"i1"}.__contains__) is None
    rej = check_item_known(ev, {"i2"}.__contains__)
    assert rej.code == "unknown_item"


def test_encode_then_parse_is_the_identity():
    ev = Event("e-9", "user é", "item/1", "purchase", TS + 17, 0.0)
    assert parse_event(encode_event(ev), ev.user_id.encode(), TS + 17) == ev


def test_dead_letter_value_keeps_payload_and_reason():
    rej = Rejection("not_json", "bad")
    text = json.loads(dead_letter_value(b"garbage", rej, "t/1@5"))
    assert text == {"reason": "not_json", "message": "bad", "source": "t/1@5", "payload": "garbage"}
    binary = json.loads(dead_letter_value(b"\xff\x00", rej, "t/1@6"))
    assert binary["payload_base64"] == "/wA=" and "payload" not in binary
    assert dict(dead_letter_headers(rej, "t", 1, 5)) == {
        "reason": b"not_json", "source_topic": b"t", "source_partition": b"1", "source_offset": b"5",
    }


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=6),
    max_leaves=20,
)
contract_fields = st.fixed_dictionaries(
    {},
    optional={
        "event_id": st.one_of(st.text(max_size=300), json_values),
        "user_id": st.one_of(st.text(max_size=10), json_values),
        "item_id": st.one_of(st.text(max_size=10), json_values),
        "event_type": st.one_of(st.sampled_from(["click", "view", ""]), st.text(max_size=70), json_values),
        "ts": st.one_of(st.integers(), st.floats(allow_nan=True, allow_infinity=True), json_values),
        "weight": st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(), json_values),
    },
)


def _check(result):
    assert isinstance(result, (Event, Rejection))
    if isinstance(result, Rejection):
        assert result.code in REASONS
    else:
        assert isinstance(result.ts, int) and 631_152_000_000 <= result.ts < 4_102_444_800_000
        assert result.weight >= 0 and result.event_id and result.user_id and result.item_id
        result.user_id.encode("utf-8")  # must be encodable into a Redis key


@hsettings(max_examples=200, deadline=None)
@given(st.binary(max_size=400), st.one_of(st.none(), st.binary(max_size=12)), st.one_of(st.none(), st.integers()))
def test_fuzz_arbitrary_bytes_never_crash(value, key, record_ts):
    _check(parse_event(value, key, record_ts))


@hsettings(max_examples=250, deadline=None)
@given(contract_fields, st.one_of(st.none(), st.integers(min_value=-1, max_value=5_000_000_000_000)))
def test_fuzz_contract_shaped_objects_never_crash(obj, record_ts):
    value = json.dumps(obj, allow_nan=True).encode()
    key = obj.get("user_id").encode("utf-8", "surrogatepass") if isinstance(obj.get("user_id"), str) else b"k"
    _check(parse_event(value, key, record_ts))

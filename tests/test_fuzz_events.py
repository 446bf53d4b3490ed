"""Property-based fuzz of the event parser (streaming.events.parse_event) beyond the contract-
shaped fuzz of test_stream_events: byte-level mutations of valid events, field-level mutations
(any JSON value in any field, fields dropped, duplicated, padded), arbitrary JSON documents and
pathological nesting. Whatever comes in, the parser returns an Event or a Rejection with a known
reason, the same answer twice, and a dead-letter record can always be built from it.

Then every malformed class the parser knows is sent through the real broker to the real
consumer: each record ends in the dead-letter topic once, with its reason in the value and the
headers, while the valid events around them are applied."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from streaming.events import (
    REASONS,
    Event,
    Limits,
    Rejection,
    _parse_canonical,
    _parse_clean,
    _parse_full,
    dead_letter_headers,
    dead_letter_value,
    encode_event,
    parse_event,
)
from tests.kafka_fixtures import kafka_broker, kafka_settings  # noqa: F401 - fixtures
from tests.test_stream_events import body as bad  # a valid event of u1 with some fields changed

TS = 1_709_251_200_000  # 2024-03-01T00:00Z
VALID = Event("e-1", "u1", "i1", "click", TS, 1.0)
FIELDS = ("event_id", "user_id", "item_id", "event_type", "ts", "weight")

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=30)
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=10), c, max_size=5), max_leaves=15)
record_ts = st.one_of(st.none(), st.integers(min_value=-(2**63), max_value=2**63 - 1))
keys = st.one_of(st.none(), st.binary(max_size=20), st.just(b"u1"))


def check(result, value: bytes | None, key: bytes | None = None, ts: int | None = None) -> None:
    """The parser's contract, whatever the input; the two fast paths (the contract's own
    encoding, clean messages), where they answer, answer exactly as the full checks do."""
    assert isinstance(result, (Event, Rejection))
    try:
        text = (value or b"").decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None:
        full = _parse_full(text, key, ts, Limits(), True)
        for fast in (_parse_canonical(text, key, ts, Limits(), True), _parse_clean(text, key, ts, Limits(), True)):
            assert fast is None or (fast == full and type(fast.weight) is float and type(fast.ts) is int)
        if value and len(value) <= Limits().max_bytes:
            assert result == full  # parse_event's answer is the full checks' answer, fast path or not
    if isinstance(result, Rejection):
        assert result.code in REASONS and result.code != "unknown_item" and result.message
        record = json.loads(dead_letter_value(value, result, "t/0@1"))  # always buildable, always JSON
        assert record["reason"] == result.code
        raw = value or b""
        kept = record["payload"].encode("utf-8") if "payload" in record else base64.b64decode(record["payload_base64"])
        assert kept == raw  # the original bytes survive into the dead letter
        assert dict(dead_letter_headers(result, "t", 0, 1))["reason"] == result.code.encode()
    else:
        assert 631_152_000_000 <= result.ts < 4_102_444_800_000 and isinstance(result.ts, int)
        assert 0 <= result.weight <= 10_000
        for name in ("event_id", "user_id", "item_id"):
            getattr(result, name).encode("utf-8")  # a Redis key can hold it
            assert "\t" not in getattr(result, name)
        assert parse_event(encode_event(result), result.user_id.encode(), None) == result  # round trip


def test_the_fast_path_answers_for_clean_messages_and_only_for_them():
    text = encode_event(VALID).decode()
    assert _parse_clean(text, b"u1", TS, Limits(), True) == VALID
    assert _parse_clean(text.replace('"ts"', '"ts" '), b"u1", TS, Limits(), True) == VALID  # blanks before a colon
    assert _parse_clean(text[:-1] + ',"ts":1}', b"u1", TS, Limits(), True) is None  # a repeated key
    assert _parse_clean(text[:-1] + ',"x":{"ts":1}}', b"u1", TS, Limits(), True) is None  # nested: full checks
    assert _parse_clean(text, b"u2", TS, Limits(), True) is None  # key mismatch: the full checks word it


def test_the_canonical_path_answers_for_the_contracts_own_encoding_and_only_for_it():
    """encode_event's exact text is matched, not decoded; anything else (other key order, blanks,
    escapes, a weight as an integer or in exponent form is still canonical) falls through."""
    text = encode_event(VALID).decode()
    assert _parse_canonical(text, b"u1", TS, Limits(), True) == VALID
    for other in (
        json.dumps(VALID._asdict()),  # blanks after ':' and ','
        text.replace('{"event_id":"e-1",', "{").replace("}", ',"event_id":"e-1"}'),  # another key order
        text.replace(',"weight":1.0', ""),  # weight absent (1.0 by the contract)
        text[:-1] + ',"ts":1}',  # a repeated key
        text.replace('"i1"', '"i\\1"'),  # an escape
        text.replace(str(TS), "-" + str(TS)),  # negative ts
        text.replace(str(TS), str(TS) + ".0"),  # a float ts: wrong type, the full path words it
        text.replace("1.0", "NaN"),
        text.replace("1.0", "-1.0"),
        text + " ",
    ):
        assert _parse_canonical(other, b"u1", TS, Limits(), True) is None
        assert parse_event(other.encode(), b"u1", TS) == _parse_full(other, b"u1", TS, Limits(), True)
    for weight_text, weight in (("2", 2.0), ("0", 0.0), ("2.5e1", 25.0), ("1E-3", 0.001), ("0.000", 0.0)):
        doc = text.replace("1.0", weight_text)
        assert _parse_canonical(doc, b"u1", TS, Limits(), True) == VALID._replace(weight=weight) == _parse_full(doc, b"u1", TS, Limits(), True)
    for weight_text in ("10001", "1e999", "10000.5", "9" * 16):  # above max_weight (1e999 is inf)
        assert _parse_canonical(text.replace("1.0", weight_text), b"u1", TS, Limits(), True) is None
    assert _parse_canonical(text, b"u2", TS, Limits(), True) is None  # key mismatch
    assert _parse_canonical(text, None, TS, Limits(), True) is None and _parse_canonical(text, None, TS, Limits(), False) == VALID
    assert _parse_canonical(text, b"u1", TS - 3_600_001, Limits(), True) is None  # ts too far after the record's
    for ts in (1, 631_151_999_999, 4_102_444_800_000):  # seconds, before 1990, from 2100 on
        doc = text.replace(str(TS), str(ts))
        assert _parse_canonical(doc, b"u1", None, Limits(), True) is None
        assert isinstance(_parse_full(doc, b"u1", None, Limits(), True), Rejection)
    for bad_id in (" i", "i\xa0", "i\u2028", "x" * 257):  # raw blanks to strip, too long: the full path words it
        doc = encode_event(VALID._replace(item_id=bad_id)).decode()
        assert _parse_canonical(doc, b"u1", TS, Limits(), True) is None
        assert _parse_full(doc, b"u1", TS, Limits(), True).code in ("id_bad_characters", "id_too_long")
    nonascii = VALID._replace(item_id="caf\u00e9 \u00fcber", event_id="e:1")  # raw UTF-8 and inner blanks: canonical
    assert _parse_canonical(encode_event(nonascii).decode(), b"u1", TS, Limits(), True) == nonascii


def test_the_fast_path_skips_no_check_it_shortcuts():
    """The fast path's shortcuts (a ':' count for duplicates, no id regex without escapes, the key
    compared as bytes, event types remembered) each fall back to, or agree with, the full checks."""
    text = encode_event(VALID).decode()
    colon = Event("urn:e:1", "u1", "i:1", "add:cart", TS, 1.0)  # colons in values: KEY_END_RE decides
    assert _parse_clean(encode_event(colon).decode(), b"u1", TS, Limits(), True) == colon
    assert _parse_clean(encode_event(colon).decode()[:-1] + ',"ts":1}', b"u1", TS, Limits(), True) is None
    assert _parse_clean(text[:-1] + ',"user_id" :"u1"}', b"u1", TS, Limits(), True) is None  # a repeat '":' misses
    escaped = json.dumps(VALID._replace(item_id="caf\u00e9")._asdict())  # ensure_ascii: a backslash
    assert _parse_clean(escaped, b"u1", TS, Limits(), True) == VALID._replace(item_id="caf\u00e9")
    for bad_id in ("i\x00", "i\x7f", "i\ud800", "i\x1f", " i", "i\xa0", "i\u2028"):
        for escape in (True, False):  # "\u0000" escaped, or DEL / NBSP raw: both refused
            doc = json.dumps(VALID._replace(item_id=bad_id)._asdict(), ensure_ascii=escape)
            if not escape and any(c < " " or "\ud800" <= c <= "\udfff" for c in bad_id):
                continue  # raw control characters are not JSON; raw surrogates are not UTF-8
            assert _parse_clean(doc, b"u1", TS, Limits(), True) is None
            assert _parse_full(doc, b"u1", TS, Limits(), True).code == "id_bad_characters"
    # a key that is not user_id's UTF-8 but decodes (errors="replace") to it: the full path accepts
    odd = VALID._replace(user_id="u\ufffd")
    assert _parse_clean(encode_event(odd).decode(), b"u\xff", TS, Limits(), True) is None
    assert parse_event(encode_event(odd), b"u\xff", TS) == odd
    assert parse_event(encode_event(VALID) + b"\n", b"u1", TS) == VALID  # trailing blank: full path
    assert parse_event(encode_event(VALID) + b"\x0b", b"u1", TS).code == "not_json"  # not JSON whitespace
    for _ in range(2):  # event types are remembered once good: bad ones stay bad
        assert parse_event(encode_event(VALID._replace(event_type="rating")), b"u1", TS).event_type == "rating"
        assert parse_event(encode_event(VALID._replace(event_type="add to cart")), b"u1", TS).code == "bad_event_type"
    assert _parse_clean(text.replace("1.0", "1.0 "), b"u1", TS, Limits(), True) == VALID  # blanks after a value


ids = st.text(alphabet=st.sampled_from("ab1:-_ \t\x00\x1f\x7f\\\"\u00e9\ufffd\xa0\u2028\ud800"), min_size=0, max_size=6)


@hsettings(max_examples=400, deadline=None)
@given(ids, ids, ids, st.sampled_from(["click", "a:b", "click\n", "", "x y"]), st.booleans(),
       st.sampled_from([(",", ":"), (", ", ": ")]), st.sampled_from(["same", "none", "replace", "other"]))
def test_ids_near_the_fast_paths_shortcuts(event_id, user_id, item_id, event_type, ascii_only, seps, key_kind):
    """Ids and keys built from exactly the characters the shortcuts reason about (escapes, DEL,
    colons, blanks, U+FFFD, lone surrogates): parse_event answers as the full checks do."""
    doc = {"event_id": event_id, "user_id": user_id, "item_id": item_id, "event_type": event_type, "ts": TS}
    value = json.dumps(doc, ensure_ascii=ascii_only, separators=seps).encode("utf-8", "surrogatepass")
    raw_user = user_id.encode("utf-8", "surrogatepass")
    key = {"same": raw_user, "none": None, "replace": raw_user.replace("\ufffd".encode(), b"\xff"), "other": b"u2"}[key_kind]
    check(parse_twice(value, key, TS), value, key, TS)


def parse_twice(value, key, ts):
    first = parse_event(value, key, ts)
    assert parse_event(value, key, ts) == first  # deterministic: a replay judges a record the same way
    return first


@hsettings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_byte_mutations_of_valid_events(data):
    raw = bytearray(encode_event(VALID))
    for _ in range(data.draw(st.integers(1, 6))):
        op = data.draw(st.sampled_from(["flip", "insert", "delete", "replace"]))
        at = data.draw(st.integers(0, max(0, len(raw) - 1)))
        if op == "flip" and raw:
            raw[at] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "insert":
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and raw:
            del raw[at : at + data.draw(st.integers(1, 8))]
        elif raw:
            raw[at] = data.draw(st.integers(0, 255))
    value = bytes(raw)
    key, ts = data.draw(keys), data.draw(record_ts)
    check(parse_twice(value, key, ts), value, key, ts)


@hsettings(max_examples=300, deadline=None)
@given(st.data())
def test_field_mutations_of_valid_events(data):
    obj = json.loads(encode_event(VALID))
    for name in data.draw(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=3, unique=True)):
        how = data.draw(st.sampled_from(["value", "drop", "null"]))
        if how == "drop":
            obj.pop(name)
        else:
            obj[name] = None if how == "null" else data.draw(json_values)
    text = json.dumps(obj, allow_nan=True, ensure_ascii=data.draw(st.booleans()))
    if data.draw(st.booleans()):  # a duplicated key, the second value differing or not
        name = data.draw(st.sampled_from(FIELDS))
        again = getattr(VALID, name) if data.draw(st.booleans()) else data.draw(json_values)  # a valid repeat too
        colon = data.draw(st.sampled_from([":", " :", "\n: "]))  # blanks before the colon too
        text = text[:-1] + f',"{name}"{colon}{json.dumps(again, allow_nan=True)}' + "}"
    value = text.encode("utf-8", "surrogatepass")
    key, ts = data.draw(keys), data.draw(record_ts)
    check(parse_twice(value, key, ts), value, key, ts)


@hsettings(max_examples=200, deadline=None)
@given(json_values, keys, record_ts)
def test_arbitrary_json_documents(doc, key, ts):
    value = json.dumps(doc, allow_nan=True).encode("utf-8", "surrogatepass")
    check(parse_twice(value, key, ts), value, key, ts)


@pytest.mark.parametrize("value", [
    b"[" * 100_000 + b"]" * 100_000,  # nesting deeper than the recursion limit
    b'{"a":' * 20_000 + b"1" + b"}" * 20_000,
    b"\x00" * 1000,
    b"\xef\xbb\xbf" + encode_event(VALID),  # a UTF-8 byte-order mark
    encode_event(VALID) + b" \n\t",  # trailing blanks are still one JSON value
    encode_event(VALID) + b"{}",  # two JSON values
    b'{"event_id":"e","user_id":"u1","item_id":"i","event_type":"click","ts":1e400}',
    b'{"event_id":"e","user_id":"u1","item_id":"i","event_type":"click","ts":-1709251200000}',
    b'{"event_id":"e","user_id":"u1","item_id":"i","event_type":"click","ts":1709251200000,"weight":1e400}',
])
def test_pathological_values(value):
    check(parse_twice(value, b"u1", TS), value, b"u1", TS)


# --- every malformed class through the real broker and consumer ----------------------------------------

# (reason, key, value, record timestamp): one record per rejection class the parser has
MALFORMED = [
    ("empty_payload", b"u1", b"", TS),
    ("payload_too_large", b"u1", bad(pad="x" * 70_000), TS),
    ("not_utf8", b"u1", b'{"event_id":"\xff\xfe"}', TS),
    ("not_json", b"u1", b'{"event_id": "e1", ', TS),
    ("not_object", b"u1", b'["e1","u1"]', TS),
    ("duplicate_field", b"u1", b'{"event_id":"d","user_id":"u1","user_id":"u2","item_id":"i1","event_type":"click","ts":1709251260000}', TS),
    ("missing_field", b"u1", bad(item_id=...), TS),
    ("wrong_type", b"u1", bad(item_id=7), TS),
    ("empty_id", b"u1", bad(event_id="  "), TS),
    ("id_too_long", b"u1", bad(item_id="i" * 300), TS),
    ("id_bad_characters", b"u1", bad(item_id="i1\tx"), TS),
    ("bad_ts", b"u1", bad(ts="soon"), TS),
    ("ts_out_of_range", b"u1", bad(ts=1_709_251_260), TS),  # epoch seconds
    ("ts_after_send_time", b"u1", bad(ts=TS + 3 * 3_600_000), TS),
    ("bad_weight", b"u1", bad(weight=-2), TS),
    ("bad_event_type", b"u1", bad(event_type="add to cart!"), TS),
    ("missing_key", None, bad(), TS),
    ("key_mismatch", b"u2", bad(), TS),
]


@pytest.mark.kafka
@pytest.mark.redis
def test_every_malformed_class_lands_in_the_dead_letter_topic_with_its_reason(kafka_settings, redis_client, tmp_path):
    from streaming.clients import make_consumer
    from streaming.consumer import run_bounded
    from tests.kafka_fixtures import Record, partition_of, produce, publish_tiny, write_tiny_artifact

    assert len({reason for reason, *_ in MALFORMED}) >= 12
    assert {reason for reason, *_ in MALFORMED} == set(REASONS) - {"unknown_item"}  # every class the parser has
    s = kafka_settings
    publish_tiny(redis_client, s.redis.prefix, write_tiny_artifact(tmp_path / "artifacts", "v1", TS))
    records = []
    for n, (_, key, value, ts) in enumerate(MALFORMED):
        good = encode_event(Event(f"good-{n}", "u1", "i2", "click", ts + n * 1000, 1.0))
        records += [Record(b"u1", good, ts + n * 1000), Record(key, value, ts)]
    tail = TS + 3 * 3_600_000  # one later event on every partition closes the first hour
    owners = {partition_of(f"u{u}", s.kafka.partitions): f"u{u}" for u in range(50, 0, -1)}
    assert len(owners) == s.kafka.partitions
    records += [Record(u.encode(), encode_event(Event(f"tail-{p}", u, "i1", "click", tail, 1.0)), tail) for p, u in owners.items()]
    produce(s, records)

    report = run_bounded(s)
    assert report["status"] == "ok" and report["dead_letters"] == len(MALFORMED)
    assert report["events_applied"] == len(MALFORMED)  # the valid events between them were applied
    dlq = make_consumer(s.kafka, s.kafka.dead_letter_topic, group_id=None, consumer_timeout_ms=3000)
    got = list(dlq)
    dlq.close()
    assert sorted(json.loads(r.value)["reason"] for r in got) == sorted(reason for reason, *_ in MALFORMED)
    by_reason = {json.loads(r.value)["reason"]: r for r in got}
    for reason, key, value, _ in MALFORMED:
        r = by_reason[reason]
        body = json.loads(r.value)
        assert dict(r.headers)["reason"] == reason.encode() and body["message"]
        kept = body["payload"].encode() if "payload" in body else base64.b64decode(body["payload_base64"])
        assert kept == value and r.key == key

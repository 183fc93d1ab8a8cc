"""Decoding is the wall in front of per-key state: every accepted shape must land on the right
key, time and raw vector, and every bad message must come out as a BadEvent with the reason code
the DLQ and the dead-letter counter are labelled with (never as any other exception)."""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pytest

from streamer.errors import BadEvent
from streamer.events import (
    BAD_TIMESTAMP,
    FEATURE_COUNT,
    FUTURE_TIMESTAMP,
    KEY_MISMATCH,
    MISSING_KEY,
    MISSING_READING,
    NON_FINITE,
    NOT_JSON,
    NOT_UTF8,
    OUT_OF_RANGE,
    SCHEMA,
    UNKNOWN_READING,
    DecodedEvent,
    Message,
    decode,
    decode_batch,
    parse_timestamp,
)
from streamer.features import FeatureSpec, default_spec

NOW = 1_800_000_000.0
GENERIC = default_spec("generic", n_features=3)
TICK = default_spec("tick")
SENSOR = default_spec("sensor", readings=("temp", "vibration", "pressure"))
SPECS = {"generic": GENERIC, "tick": TICK, "sensor": SENSOR}


def _js(payload: Any) -> bytes:
    return json.dumps(payload).encode()


def _decode(value: bytes | None, key: bytes | None = None, spec: FeatureSpec = GENERIC,
            max_future_s: float = 300.0) -> DecodedEvent:
    return decode(value, key, spec, now=NOW, max_future_s=max_future_s)


def _reason(value: bytes | None, key: bytes | None = None, spec: FeatureSpec = GENERIC,
            max_future_s: float = 300.0) -> BadEvent:
    with pytest.raises(BadEvent) as info:
        _decode(value, key, spec, max_future_s)
    return info.value


def _generic(**overrides: Any) -> dict[str, Any]:
    return {"key": "k17", "ts": 1_732_790_000.123, "values": [0.1, 0.2, 0.3]} | overrides


def _tick(**overrides: Any) -> dict[str, Any]:
    base = {"symbol": "AAPL", "ts": 1_732_790_000.5, "price": 189.2, "size": 100,
            "bid": 189.1, "ask": 189.3}
    return base | overrides


def _sensor(**overrides: Any) -> dict[str, Any]:
    base = {"sensor_id": "pump-7", "ts": 1_732_790_000,
            "readings": {"temp": 71.2, "vibration": 0.03, "pressure": 2.5}}
    return base | overrides


# --- accepted shapes ---------------------------------------------------------------------------


def test_generic_event_decodes_key_ts_and_values() -> None:
    ev = _decode(_js(_generic()))
    assert ev == DecodedEvent("k17", 1_732_790_000.123, 1_732_790_000.123, [0.1, 0.2, 0.3])


def test_generic_integer_values_become_floats() -> None:
    ev = _decode(_js(_generic(values=[1, 2, 3])))
    assert ev.raw == [1.0, 2.0, 3.0]
    assert all(isinstance(v, float) for v in ev.raw)


def test_tick_raw_is_price_size_bid_ask() -> None:
    ev = _decode(_js(_tick()), spec=TICK)
    assert ev.key == "AAPL"
    assert ev.ts == 1_732_790_000.5
    assert ev.raw == [189.2, 100.0, 189.1, 189.3]


@pytest.mark.parametrize(
    "drop, expect_bid_nan, expect_ask_nan",
    [(("bid",), True, False), (("ask",), False, True), (("bid", "ask"), True, True)],
)
def test_tick_absent_bid_or_ask_is_nan(
    drop: tuple[str, ...], expect_bid_nan: bool, expect_ask_nan: bool
) -> None:
    payload = {k: v for k, v in _tick().items() if k not in drop}
    ev = _decode(_js(payload), spec=TICK)
    price, size, bid, ask = ev.raw
    assert (price, size) == (189.2, 100.0)
    assert math.isnan(bid) == expect_bid_nan
    assert math.isnan(ask) == expect_ask_nan
    if not expect_bid_nan:
        assert bid == 189.1
    if not expect_ask_nan:
        assert ask == 189.3


def test_tick_null_bid_is_treated_as_absent() -> None:
    ev = _decode(_js(_tick(bid=None)), spec=TICK)
    assert math.isnan(ev.raw[2]) and ev.raw[3] == 189.3


def test_tick_zero_size_is_accepted() -> None:
    assert _decode(_js(_tick(size=0)), spec=TICK).raw[1] == 0.0


@pytest.mark.parametrize(
    "readings",
    [
        {"temp": 71.2, "vibration": 0.03, "pressure": 2.5},
        {"pressure": 2.5, "temp": 71.2, "vibration": 0.03},
        {"vibration": 0.03, "pressure": 2.5, "temp": 71.2},
    ],
)
def test_sensor_raw_follows_spec_names_not_json_order(readings: dict[str, float]) -> None:
    ev = _decode(_js(_sensor(readings=readings)), spec=SENSOR)
    assert ev.key == "pump-7"
    assert ev.raw == [71.2, 0.03, 2.5]


def test_sensor_raw_order_follows_a_different_spec_order() -> None:
    spec = default_spec("sensor", readings=("pressure", "temp", "vibration"))
    ev = _decode(_js(_sensor()), spec=spec)
    assert ev.raw == [2.5, 71.2, 0.03]


def test_extra_top_level_fields_are_ignored() -> None:
    ev = _decode(_js(_generic(source="plc-3", seq=9)))
    assert ev.raw == [0.1, 0.2, 0.3]


# --- timestamps --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ts, seconds",
    [
        (1_732_790_000.123, 1_732_790_000.123),  # float seconds
        (1_732_790_000, 1_732_790_000.0),  # int seconds
        (1_732_790_000_123, 1_732_790_000.123),  # int milliseconds
        (1_732_790_000_123.0, 1_732_790_000.123),  # float >= 1e11 is milliseconds too
        (99_999_999_999, 99_999_999_999.0),  # just under 1e11: seconds
        (100_000_000_000, 100_000_000.0),  # exactly 1e11: milliseconds
        (0, 0.0),
        (-5, -5.0),
        (-100_000_000_000, -100_000_000.0),  # the rule is on |x|
        ("2024-11-28T10:33:20Z", 1_732_790_000.0),
        ("2024-11-28T10:33:20.123Z", 1_732_790_000.123),
        ("2024-11-28T11:33:20+01:00", 1_732_790_000.0),
        ("2024-11-28T05:33:20-05:00", 1_732_790_000.0),
        ("2024-11-28T10:33:20", 1_732_790_000.0),  # naive means UTC
        ("2024-11-28 10:33:20", 1_732_790_000.0),
    ],
)
def test_timestamp_rule(ts: float | int | str, seconds: float) -> None:
    assert parse_timestamp(ts) == pytest.approx(seconds, abs=1e-6)
    ev = _decode(_js(_generic(ts=ts)), max_future_s=1e12)  # far-future rows stay decodable
    assert ev.ts == pytest.approx(seconds, abs=1e-6)
    assert ev.ts_raw == ts and type(ev.ts_raw) is type(ts)  # echoed exactly as sent


def test_naive_iso_is_utc_whatever_the_local_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    monkeypatch.setenv("TZ", "Asia/Kolkata")
    time.tzset()
    try:
        assert parse_timestamp("2024-11-28T10:33:20") == 1_732_790_000.0
    finally:
        monkeypatch.undo()
        time.tzset()


def test_iso_timestamp_matches_datetime() -> None:
    expected = datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc).timestamp()
    assert _decode(_js(_generic(ts="2030-01-02T03:04:05Z")), max_future_s=1e12).ts == expected


@pytest.mark.parametrize("ts", ["yesterday", "", "1732790000", "2024-13-01", "2024-11-28T25:00"])
def test_unparseable_iso_is_bad_timestamp(ts: str) -> None:
    err = _reason(_js(_generic(ts=ts)))
    assert err.reason == BAD_TIMESTAMP
    assert repr(ts) in err.detail


def test_future_timestamp_beyond_max_future_is_refused() -> None:
    err = _reason(_js(_generic(ts=NOW + 301)), max_future_s=300)
    assert err.reason == FUTURE_TIMESTAMP


def test_future_timestamp_in_milliseconds_is_refused() -> None:
    err = _reason(_js(_generic(ts=int((NOW + 301) * 1000))), max_future_s=300)
    assert err.reason == FUTURE_TIMESTAMP


@pytest.mark.parametrize("ahead", [299.0, 300.0, 0.0, -86_400.0])
def test_timestamp_just_inside_max_future_is_accepted(ahead: float) -> None:
    assert _decode(_js(_generic(ts=NOW + ahead)), max_future_s=300).ts == NOW + ahead


def test_max_future_is_configurable() -> None:
    payload = _js(_generic(ts=NOW + 10))
    assert _reason(payload, max_future_s=5).reason == FUTURE_TIMESTAMP
    assert _decode(payload, max_future_s=10).ts == NOW + 10


@pytest.mark.parametrize("digits", ["9" * 400, "-" + "9" * 400])
def test_integer_timestamp_beyond_float_range_is_a_bad_event(digits: str) -> None:
    value = b'{"key": "k", "ts": ' + digits.encode() + b', "values": [1, 2, 3]}'
    err = _reason(value)
    assert err.reason in (NON_FINITE, BAD_TIMESTAMP)



def test_batch_with_overflowing_integer_timestamp_dead_letters_only_that_message() -> None:
    poison = b'{"key": "k", "ts": ' + b"9" * 400 + b', "values": [1, 2, 3]}'
    batch = decode_batch([Message(None, _js(_generic())), Message(None, poison)], GENERIC, NOW)
    assert batch.keys == ["k17"]
    assert [i for i, _ in batch.bad] == [1]

# --- keys --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, payload, key_field",
    [("generic", _generic(), "key"), ("tick", _tick(), "symbol"),
     ("sensor", _sensor(), "sensor_id")],
)
def test_kafka_key_is_used_when_payload_has_none(
    kind: str, payload: dict[str, Any], key_field: str
) -> None:
    del payload[key_field]
    ev = _decode(_js(payload), key=b"from-kafka", spec=SPECS[kind])
    assert ev.key == "from-kafka"


def test_kafka_key_utf8_is_decoded() -> None:
    payload = _generic()
    del payload["key"]
    assert _decode(_js(payload), key="pümpe-7".encode()).key == "pümpe-7"


def test_equal_payload_and_kafka_keys_are_accepted() -> None:
    assert _decode(_js(_generic()), key=b"k17").key == "k17"


@pytest.mark.parametrize(
    "kind, payload, key_field",
    [("generic", _generic(), "key"), ("tick", _tick(), "symbol"),
     ("sensor", _sensor(), "sensor_id")],
)
def test_missing_key_everywhere(kind: str, payload: dict[str, Any], key_field: str) -> None:
    del payload[key_field]
    assert _reason(_js(payload), key=None, spec=SPECS[kind]).reason == MISSING_KEY


def test_empty_payload_key_without_kafka_key_is_missing_key() -> None:
    assert _reason(_js(_generic(key=""))).reason == MISSING_KEY


def test_null_payload_key_falls_back_to_kafka_key() -> None:
    assert _decode(_js(_generic(key=None)), key=b"k9").key == "k9"


@pytest.mark.parametrize(
    "kind, payload",
    [("generic", _generic()), ("tick", _tick()), ("sensor", _sensor())],
)
def test_key_mismatch(kind: str, payload: dict[str, Any]) -> None:
    err = _reason(_js(payload), key=b"someone-else", spec=SPECS[kind])
    assert err.reason == KEY_MISMATCH
    assert "someone-else" in err.detail


# --- bad inputs --------------------------------------------------------------------------------


def test_value_not_utf8() -> None:
    assert _reason(b"\xff\xfe\x00garbage").reason == NOT_UTF8


def test_invalid_utf8_inside_a_json_string_is_not_utf8() -> None:
    value = b'{"key": "k\xff", "ts": 1, "values": [1, 2, 3]}'
    assert _reason(value).reason == NOT_UTF8


def test_key_not_utf8() -> None:
    payload = _generic()
    del payload["key"]
    err = _reason(_js(payload), key=b"\xc3\x28")
    assert err.reason == NOT_UTF8
    assert "key" in err.detail


@pytest.mark.parametrize("value", [b"not json", b"", b"{", b'{"key": "k",}', b"   "])
def test_not_json(value: bytes) -> None:
    assert _reason(value).reason == NOT_JSON


def test_tombstone_is_refused_with_a_reason() -> None:
    err = _reason(None, key=b"k17")
    assert err.reason == NOT_JSON
    assert "tombstone" in err.detail


@pytest.mark.parametrize(
    "kind, payload",
    [
        ("tick", _tick(price="189.2")),  # string where a number belongs (strict: no coercion)
        ("tick", _tick(size="100")),
        ("tick", _tick(bid=True)),
        ("generic", _generic(ts=True)),  # bool is not a timestamp
        ("generic", _generic(ts=None)),
        ("generic", _generic(ts=[1])),
        ("generic", _generic(values=[1, "2", 3])),
        ("generic", _generic(values=[True, 2.0, 3.0])),
        ("generic", _generic(values=None)),
        ("generic", _generic(values={"a": 1})),
        ("generic", _generic(key=17)),
        ("sensor", _sensor(readings=[71.2, 0.03, 2.5])),  # list for readings
        ("sensor", _sensor(readings={"temp": "hot", "vibration": 0.03, "pressure": 2.5})),
        ("sensor", _sensor(sensor_id=7)),
    ],
)
def test_wrong_types_are_schema_errors(kind: str, payload: dict[str, Any]) -> None:
    assert _reason(_js(payload), spec=SPECS[kind]).reason == SCHEMA


@pytest.mark.parametrize(
    "kind, missing",
    [("generic", "ts"), ("generic", "values"), ("tick", "ts"), ("tick", "price"),
     ("tick", "size"), ("sensor", "ts"), ("sensor", "readings")],
)
def test_missing_fields_are_schema_errors(kind: str, missing: str) -> None:
    payload = {"generic": _generic, "tick": _tick, "sensor": _sensor}[kind]()
    del payload[missing]
    err = _reason(_js(payload), spec=SPECS[kind])
    assert err.reason == SCHEMA
    assert missing in err.detail


@pytest.mark.parametrize("value", [b"[1, 2, 3]", b"null", b"42", b'"text"', b"[]"])
def test_json_that_is_not_an_object_is_schema(value: bytes) -> None:
    assert _reason(value).reason == SCHEMA


@pytest.mark.parametrize(
    "kind, value",
    [
        ("generic", b'{"key": "k", "ts": 1, "values": [NaN, 2, 3]}'),
        ("generic", b'{"key": "k", "ts": 1, "values": [1, Infinity, 3]}'),
        ("generic", b'{"key": "k", "ts": 1, "values": [1, 2, -Infinity]}'),
        ("generic", b'{"key": "k", "ts": 1, "values": [1e400, 2, 3]}'),
        ("generic", b'{"key": "k", "ts": NaN, "values": [1, 2, 3]}'),
        ("generic", b'{"key": "k", "ts": 1e400, "values": [1, 2, 3]}'),
        ("tick", b'{"symbol": "A", "ts": 1, "price": NaN, "size": 1}'),
        ("tick", b'{"symbol": "A", "ts": 1, "price": 1, "size": 1e999}'),
        ("tick", b'{"symbol": "A", "ts": 1, "price": 1, "size": 1, "bid": Infinity}'),
        ("sensor", b'{"sensor_id": "p", "ts": 1, '
                   b'"readings": {"temp": NaN, "vibration": 1, "pressure": 1}}'),
    ],
)
def test_non_finite_numbers(kind: str, value: bytes) -> None:
    assert _reason(value, spec=SPECS[kind]).reason == NON_FINITE


@pytest.mark.parametrize("n", [0, 2, 4])
def test_generic_feature_count(n: int) -> None:
    err = _reason(_js(_generic(values=[0.5] * n)))
    assert err.reason == FEATURE_COUNT
    assert "expected 3" in err.detail and f"got {n}" in err.detail


def test_sensor_unknown_reading() -> None:
    readings = {"temp": 1.0, "vibration": 2.0, "pressure": 3.0, "humidity": 4.0}
    err = _reason(_js(_sensor(readings=readings)), spec=SENSOR)
    assert err.reason == UNKNOWN_READING
    assert "humidity" in err.detail


def test_sensor_missing_reading() -> None:
    err = _reason(_js(_sensor(readings={"temp": 1.0, "pressure": 3.0})), spec=SENSOR)
    assert err.reason == MISSING_READING
    assert "vibration" in err.detail


@pytest.mark.parametrize(
    "overrides",
    [{"price": 0}, {"price": -1.5}, {"price": -0.0}, {"size": -1}, {"size": -0.001}],
)
def test_tick_out_of_range(overrides: dict[str, float]) -> None:
    assert _reason(_js(_tick(**overrides)), spec=TICK).reason == OUT_OF_RANGE


def test_bad_event_message_carries_reason_and_detail() -> None:
    err = _reason(_js(_generic(values=[1.0])))
    assert str(err) == f"{err.reason}: {err.detail}"


# --- decode_batch ------------------------------------------------------------------------------


def test_decode_batch_splits_good_and_bad_keeping_indices_and_order() -> None:
    messages = [
        Message(None, _js(_generic(key="a", ts=10, values=[1, 2, 3])), 0, 100),
        Message(None, b"not json", 0, 101),
        Message(b"b", _js({"ts": 11.5, "values": [4, 5, 6]}), 1, 7),
        Message(None, None, 1, 8),
        Message(None, _js(_generic(key="a", ts="1970-01-01T00:00:12Z", values=[7, 8, 9])), 0, 102),
        Message(None, _js(_generic(values=[1])), 2, 3),
    ]
    batch = decode_batch(messages, GENERIC, now=NOW)
    assert batch.keys == ["a", "b", "a"]
    assert batch.index == [0, 2, 4]
    assert batch.ts.dtype == np.float64 and batch.ts.tolist() == [10.0, 11.5, 12.0]
    assert batch.ts_raw == [10, 11.5, "1970-01-01T00:00:12Z"]
    assert batch.raw.dtype == np.float64 and batch.raw.shape == (3, 3)
    np.testing.assert_array_equal(batch.raw, [[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    assert [(i, e.reason) for i, e in batch.bad] == [(1, NOT_JSON), (3, NOT_JSON),
                                                     (5, FEATURE_COUNT)]
    assert all(isinstance(e, BadEvent) for _, e in batch.bad)


@pytest.mark.parametrize("kind, width", [("generic", 3), ("tick", 4), ("sensor", 3)])
def test_decode_batch_empty_input_has_shaped_arrays(kind: str, width: int) -> None:
    batch = decode_batch([], SPECS[kind], now=NOW)
    assert batch.raw.shape == (0, width) and batch.raw.dtype == np.float64
    assert batch.ts.shape == (0,)
    assert batch.keys == [] and batch.index == [] and batch.bad == [] and batch.ts_raw == []


@pytest.mark.parametrize("kind, width", [("generic", 3), ("tick", 4), ("sensor", 3)])
def test_decode_batch_all_bad_has_shaped_arrays(kind: str, width: int) -> None:
    batch = decode_batch([Message(None, b"x"), Message(None, None)], SPECS[kind], now=NOW)
    assert batch.raw.shape == (0, width)
    assert batch.ts.shape == (0,)
    assert [i for i, _ in batch.bad] == [0, 1]


def test_decode_batch_tick_rows_keep_nan_for_missing_quotes() -> None:
    no_quotes = {k: v for k, v in _tick(symbol="B").items() if k not in ("bid", "ask")}
    batch = decode_batch([Message(None, _js(_tick())), Message(None, _js(no_quotes))],
                         TICK, now=NOW)
    assert batch.raw.shape == (2, 4)
    np.testing.assert_array_equal(batch.raw[0], [189.2, 100.0, 189.1, 189.3])
    assert np.isnan(batch.raw[1, 2:]).all() and batch.raw[1, 0] == 189.2


def test_decode_batch_applies_max_future() -> None:
    messages = [Message(None, _js(_generic(ts=NOW + 60)))]
    assert decode_batch(messages, GENERIC, now=NOW, max_future_s=30).bad[0][1].reason == (
        FUTURE_TIMESTAMP
    )
    assert decode_batch(messages, GENERIC, now=NOW, max_future_s=90).keys == ["k17"]


# --- hostile values: float32 range, plausible event times, key length ------------------------


@pytest.mark.parametrize(
    ("kind", "payload"),
    [
        ("generic", _generic(values=[1.7976931348623157e308] * 3)),
        ("generic", _generic(values=[1.0, 1e39, 0.0])),
        ("generic", _generic(values=[-3.5e38, 0.0, 0.0])),
        ("tick", {"symbol": "A", "ts": NOW, "price": 1e39, "size": 1}),
        ("tick", {"symbol": "A", "ts": NOW, "price": 1, "size": 1, "bid": 4e38, "ask": 5e38}),
        ("sensor", {"sensor_id": "p", "ts": NOW,
                    "readings": {"temp": 1e300, "vibration": 0, "pressure": 0}}),
    ],
)
def test_values_beyond_float32_are_out_of_range(kind: str, payload: dict[str, Any]) -> None:
    with pytest.raises(BadEvent) as info:
        decode(_js(payload), None, SPECS[kind], now=NOW)
    assert info.value.reason == "out_of_range"


def test_largest_float32_is_accepted() -> None:
    ev = decode(_js(_generic(values=[3.4028234663852886e38, -3.4e38, 0.0])), None, GENERIC,
                now=NOW)
    assert ev.raw[0] == 3.4028234663852886e38


@pytest.mark.parametrize("ts", [0, -1, -1e300, "1970-01-01T00:00:00", 946_684_799])
def test_event_time_before_min_event_time_is_bad_timestamp(ts: float | str) -> None:
    with pytest.raises(BadEvent) as info:
        decode(_js(_generic(ts=ts)), None, GENERIC, now=NOW, min_event_time=946_684_800)
    assert info.value.reason == "bad_timestamp"


def test_event_time_older_than_max_past_is_bad_timestamp() -> None:
    value = _js(_generic(ts=NOW - 3601))
    with pytest.raises(BadEvent) as info:
        decode(value, None, GENERIC, now=NOW, max_past_s=3600)
    assert info.value.reason == "bad_timestamp"
    assert decode(_js(_generic(ts=NOW - 3599)), None, GENERIC, now=NOW, max_past_s=3600)


@pytest.mark.parametrize("key", ["k" * 65, "é" * 33])  # 65 and 66 UTF-8 bytes
def test_payload_key_longer_than_the_limit_is_key_too_long(key: str) -> None:
    with pytest.raises(BadEvent) as info:
        decode(_js(_generic(key=key)), None, GENERIC, now=NOW, max_key_bytes=64)
    assert info.value.reason == "key_too_long"


def test_kafka_key_longer_than_the_limit_is_key_too_long() -> None:
    with pytest.raises(BadEvent) as info:
        decode(_js({"ts": NOW, "values": [1, 2, 3]}), b"k" * 65, GENERIC, now=NOW,
               max_key_bytes=64)
    assert info.value.reason == "key_too_long"
    assert decode(_js({"ts": NOW, "values": [1, 2, 3]}), b"k" * 64, GENERIC, now=NOW,
                  max_key_bytes=64).key == "k" * 64


def test_key_with_a_lone_surrogate_is_refused() -> None:
    """It could never be written back out as UTF-8 (the prediction's key)."""
    with pytest.raises(BadEvent) as info:
        decode(b'{"key": "a\\ud800", "ts": 1, "values": [1, 2, 3]}', None, GENERIC, now=NOW)
    assert info.value.reason == "not_json"

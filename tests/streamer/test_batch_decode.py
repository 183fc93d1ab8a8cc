"""The batch decoder (streamer.batch_decode) equals the per-message reference
(streamer.events.decode_batch): the same good events (key, seconds, raw time value with its
type, raw vector), the same indices, and every bad event with the same reason and detail, in
the same order, over random valid and hostile batches of all three event kinds."""

from __future__ import annotations

import json
import math
import time
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamer.batch_decode import decode_batch_fast
from streamer.events import DecodedBatch, Message, decode_batch
from streamer.features import default_spec
from streamer.simulate import make_simulator

NOW = 1_800_000_000.0
SPECS = {
    "generic": default_spec("generic", n_features=3),
    "tick": default_spec("tick"),
    "sensor": default_spec("sensor", readings=("temp", "vibration", "pressure")),
}
KEY_FIELD = {"generic": "key", "tick": "symbol", "sensor": "sensor_id"}

finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
numbers = st.one_of(
    finite, finite.map(lambda x: x / 1e300), st.integers(-(10**6), 10**6),
    st.sampled_from([0.0, -0.0, 5e-324, 3.4e38, -3.4028234663852886e38, 3.5e38, 1e39, 1e300,
                     2**63, 2**64 - 1, 2**64, 10**30, -(2**63), 9.3e18, 1e19]),
)
good_numbers = st.one_of(st.floats(-1e6, 1e6), st.integers(-1000, 1000))
hostile = st.sampled_from([
    None, True, False, "1.5", "", [], [1.0], {}, {"a": 1}, math.nan, math.inf, -math.inf,
    10**40, -(10**40), 1e39, -1e39, 2**64, "true", -1.0, -0.0, 0, 0.0, -(2**64), 1e-320,
])
timestamps = st.one_of(
    st.floats(NOW - 4000, NOW + 400), st.integers(int(NOW) - 4000, int(NOW) + 400),
    st.floats(NOW - 4000, NOW + 400).map(lambda s: s * 1000),
    st.integers(int(NOW * 1000) - 4_000_000, int(NOW * 1000) + 400_000),
    st.sampled_from([0, -1, 1e11, -1e11, 99_999_999_999, 2**63, 2**64 - 1, 2**64, 10**20,
                     -(2**63), -(2**63) - 1, -(2**64), -(10**20), -1e19, -9.3e18,
                     -1e300, 1e300, "2027-01-15T08:00:00", "2027-01-15T08:00:00+05:00",
                     "yesterday", "", "1800000000", "2027-01-15"]),
)
names = st.sampled_from(["k1", "k2", "é", "\u2603", "true", "k" * 40])


@st.composite
def valid_doc(draw: st.DrawFn, kind: str) -> dict[str, Any]:
    doc: dict[str, Any] = {"ts": draw(st.floats(NOW - 100, NOW + 10) | st.integers(
        int(NOW) - 100, int(NOW)))}
    if kind == "generic":
        doc["values"] = draw(st.lists(good_numbers, min_size=3, max_size=3))
    elif kind == "tick":
        doc["price"] = draw(st.floats(0.01, 1e4) | st.integers(1, 100))
        doc["size"] = draw(st.floats(0, 1e4) | st.integers(0, 100))
        for quote in ("bid", "ask"):
            choice = draw(st.integers(0, 2))
            if choice == 1:
                doc[quote] = draw(st.floats(0.01, 1e4))
            elif choice == 2:
                doc[quote] = None
    else:
        doc["readings"] = {n: draw(good_numbers) for n in SPECS["sensor"].names}
    return doc


@st.composite
def hostile_doc(draw: st.DrawFn, kind: str) -> Any:
    doc: Any = draw(valid_doc(kind))
    for _ in range(draw(st.integers(1, 3))):
        if not isinstance(doc, dict):
            break
        field = draw(st.sampled_from(sorted(doc) + ["ts", KEY_FIELD[kind], "extra"]))
        action = draw(st.integers(0, 5))
        if action == 0:
            doc.pop(field, None)
        elif action == 1:
            doc[field] = draw(hostile | numbers | timestamps)
        elif action == 2 and kind == "generic":
            doc["values"] = draw(st.lists(numbers | hostile, max_size=5))
        elif action == 2 and kind == "sensor":
            doc["readings"] = draw(st.dictionaries(
                st.sampled_from(["temp", "vibration", "pressure", "other"]),
                numbers | hostile, max_size=4))
        elif action == 2:
            doc[draw(st.sampled_from(["price", "size", "bid", "ask"]))] = draw(numbers | hostile)
        elif action == 3:
            doc["ts"] = draw(timestamps)
        elif action == 4:  # one number swapped for a look-alike, the structure intact
            _poison_one_number(doc, draw(hostile | numbers), draw)
        else:
            doc = draw(st.sampled_from([[], 1, "x", None, True, [doc]]))
    return doc


def _poison_one_number(doc: dict[str, Any], value: Any, draw: st.DrawFn) -> None:
    if isinstance(doc.get("values"), list) and doc["values"]:
        doc["values"][draw(st.integers(0, len(doc["values"]) - 1))] = value
    elif isinstance(doc.get("readings"), dict) and doc["readings"]:
        doc["readings"][draw(st.sampled_from(sorted(doc["readings"])))] = value
    else:
        doc[draw(st.sampled_from(["price", "size", "size", "bid", "ask", "ts"]))] = value


def _bytes(doc: Any, draw: st.DrawFn) -> bytes | None:
    text = json.dumps(doc)  # NaN/Infinity tokens on purpose
    mangle = draw(st.integers(0, 12))
    if mangle == 0:
        return None  # tombstone
    if mangle == 5:
        return text.encode() + b" "
    if mangle == 1:
        return text.encode()[:draw(st.integers(0, len(text)))]
    if mangle == 2:
        return b"\xef\xbb\xbf" + text.encode()  # BOM
    if mangle == 3 and text.startswith('{"ts": '):  # a duplicate field, the last one wins
        return ('{"ts": "x", ' + text[1:]).encode()
    if mangle == 4:
        return text.encode().replace(b"k", b"\xff", 1)
    return text.encode()


@st.composite
def message(draw: st.DrawFn, kind: str, hostile_share: float, placement: int) -> Message:
    """A valid event; a hostile one (``hostile_share`` of them) has one kind of defect, or
    several at once."""
    defect = draw(st.integers(0, 5)) if draw(st.floats(0, 1)) < hostile_share else None
    doc: Any = draw(valid_doc(kind))
    key = draw(names)
    # the key in the payload (0), the message key (1) or both (2); 3: any, per message
    where = draw(st.integers(0, 2)) if placement == 3 else placement
    if defect == 0:  # fields missing, mistyped or out of range
        doc = draw(hostile_doc(kind))
    elif defect == 1:  # one number swapped for a look-alike, the structure intact
        _poison_one_number(doc, draw(hostile | st.sampled_from([-1.0, -0.0, 0])), draw)
    elif defect == 2:
        doc["ts"] = draw(timestamps)
    if isinstance(doc, dict) and where in (0, 2):
        doc[KEY_FIELD[kind]] = key
    mk: bytes | None = key.encode() if where in (1, 2) else None
    if defect == 3:  # keys: missing, empty, mismatched, mistyped, too long, not UTF-8
        pk, mk = draw(st.sampled_from([("", b""), (None, b""), ("", None), (None, None),
                                       ("other", key.encode()), (7, key.encode()), (7, None),
                                       (key, b"\xff\xfe"), (None, b"\xff\xfe"),
                                       ("k" * 80, b"k" * 80), (None, b"k" * 80),
                                       ("k" * 80, None), ("\u2603" * 3, None)]))
        if pk is None:
            doc.pop(KEY_FIELD[kind], None)
        else:
            doc[KEY_FIELD[kind]] = pk
    value: bytes | None = json.dumps(doc).encode()
    if defect == 4:  # the bytes themselves
        value = _bytes(doc, draw)
    if defect == 5:  # everything at once
        doc = draw(hostile_doc(kind))
        if isinstance(doc, dict) and draw(st.booleans()):
            doc[KEY_FIELD[kind]] = draw(names | st.just("") | st.just(None))
        mk = draw(st.sampled_from([None, b"\xff\xfe", b"other", b"k" * 80, b"", key.encode()]))
        value = _bytes(doc, draw)
    return Message(mk, value, draw(st.integers(0, 3)), draw(st.integers(0, 10**6)))


@st.composite
def batches(draw: st.DrawFn, kind: str) -> list[Message]:
    share = draw(st.sampled_from([0.0, 0.0, 0.05, 0.05, 0.2, 0.5, 1.0]))
    placement = draw(st.sampled_from([0, 1, 2, 2, 2, 3]))
    return draw(st.lists(message(kind, share, placement), min_size=0, max_size=24))


limits = st.fixed_dictionaries({
    "max_future_s": st.sampled_from([300.0, 30.0, 1e9]),
    "max_past_s": st.sampled_from([None, 3600.0, 60.0]),
    "min_event_time": st.sampled_from([None, 946_684_800.0, NOW - 50]),
    "max_key_bytes": st.sampled_from([None, 256, 8]),
})


def assert_same(fast: DecodedBatch, ref: DecodedBatch) -> None:
    assert fast.index == ref.index
    assert fast.keys == ref.keys
    assert [(type(t), t) for t in fast.ts_raw] == [(type(t), t) for t in ref.ts_raw]
    assert fast.ts.dtype == ref.ts.dtype and np.array_equal(fast.ts, ref.ts)
    assert fast.raw.dtype == ref.raw.dtype and fast.raw.shape == ref.raw.shape
    assert np.array_equal(fast.raw, ref.raw, equal_nan=True)
    assert np.array_equal(np.signbit(fast.raw), np.signbit(ref.raw))  # -0.0 stays -0.0
    assert [(i, e.reason, e.detail) for i, e in fast.bad] == [
        (i, e.reason, e.detail) for i, e in ref.bad]


@pytest.mark.parametrize("kind", sorted(SPECS))
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_batch_decoder_equals_the_per_message_reference(kind: str, data: st.DataObject) -> None:
    messages = data.draw(batches(kind))
    kw: dict[str, Any] = data.draw(limits)
    spec = SPECS[kind]
    assert_same(decode_batch_fast(messages, spec, NOW, **kw, min_batch=0),
                decode_batch(messages, spec, NOW, **kw))


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_batch_decoder_equals_the_reference_on_simulated_streams(kind: str) -> None:
    """Realistic batches (the simulators' events, keys in both places), all valid, then with
    one poisoned message in the middle."""
    sim = make_simulator(kind, 50, seed=3)  # type: ignore[arg-type]
    now = time.time()
    events = sim.events(500)
    messages = []
    for i, ev in enumerate(events):
        ev["ts"] = now - 1.0
        key, value = sim.encode(ev)
        messages.append(Message(key, value, i % 4, i))
    spec = _spec_for(kind, events[0])
    for batch in (messages, [*messages[:250], Message(b"x", b'{"ts": true}', 0, 0),
                             *messages[250:]]):
        fast = decode_batch_fast(batch, spec, now, max_key_bytes=256)
        assert_same(fast, decode_batch(batch, spec, now, max_key_bytes=256))
    assert len(fast.keys) == 500 and len(fast.bad) == 1


def _spec_for(kind: str, event: dict[str, Any]) -> Any:
    if kind == "generic":
        return default_spec("generic", n_features=len(event["values"]))
    if kind == "sensor":
        return default_spec("sensor", readings=tuple(event["readings"]))
    return SPECS["tick"]


def _clean(kind: str, i: int) -> dict[str, Any]:
    if kind == "generic":
        return {"key": f"k{i}", "ts": NOW - i, "values": [1.0, -2, 3.5]}
    if kind == "tick":
        return {"symbol": f"k{i}", "ts": NOW - i, "price": 10.0, "size": 2, "bid": None}
    return {"sensor_id": f"k{i}", "ts": NOW - i,
            "readings": {"temp": 1.0, "vibration": 2, "pressure": 3.0}}


ODD = [  # (kind, field path, value): one look-alike in an otherwise clean, keyed batch
    ("generic", ("values", 1), True), ("generic", ("values", 0), False),
    ("generic", ("values", 2), None), ("generic", ("values", 2), "3.5"),
    ("generic", ("values", 0), [1.0]), ("generic", ("values", 0), 2**64),
    ("generic", ("ts",), True), ("generic", ("ts",), "1800000000"), ("generic", ("ts",), None),
    ("generic", ("ts",), -(2**64)), ("generic", ("ts",), "2027-01-15T08:00:00"),
    ("generic", ("key",), ""), ("generic", ("key",), "other"), ("generic", ("key",), 7),
    ("tick", ("size",), -1.0), ("tick", ("size",), -0.0), ("tick", ("price",), 0),
    ("tick", ("price",), -0.0), ("tick", ("bid",), True), ("tick", ("ask",), "1"),
    ("tick", ("size",), False), ("sensor", ("readings", "temp"), True),
    ("sensor", ("readings", "temp"), None), ("sensor", ("readings", "other"), 1.0),
    ("sensor", ("readings",), {"temp": 1.0, "vibration": 2.0}),
]


@pytest.mark.parametrize(("kind", "path", "value"), ODD)
@pytest.mark.parametrize("message_key", ["same", "empty", "none"])
def test_one_odd_value_in_a_clean_batch_is_judged_by_the_reference(
    kind: str, path: tuple[Any, ...], value: Any, message_key: str,
) -> None:
    docs = [_clean(kind, i) for i in range(6)]
    node: Any = docs[3]
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value
    field = KEY_FIELD[kind]
    messages = []
    for i, doc in enumerate(docs):
        key = doc[field] if isinstance(doc[field], str) else f"k{i}"
        mk = {"same": key.encode(), "empty": b"" if i == 3 else key.encode(),
              "none": None}[message_key]
        messages.append(Message(mk, json.dumps(doc).encode(), 0, i))
    fast = decode_batch_fast(messages, SPECS[kind], NOW, max_key_bytes=256, min_batch=0)
    assert_same(fast, decode_batch(messages, SPECS[kind], NOW, max_key_bytes=256))

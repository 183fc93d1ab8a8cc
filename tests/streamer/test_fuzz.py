"""Property-based (hypothesis) hostile input: random bytes, truncated and mistyped JSON,
extreme numbers, huge and unicode keys, deep nesting, oversized messages.

Invariants: the decoder sorts every message into exactly one good event or one dead letter
with a known reason, and a good event is safe to serve (float32-finite values, a plausible
event time, a bounded UTF-8 key); through the real service and the embedded broker, every
input offset ends as exactly one prediction or one dead letter, the service never stops, and
every output record is RFC 8259 JSON with finite numbers. Budgets are bounded so this runs in
``make test``: many examples for the decoder, a few batches through the service.
"""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path
from typing import Any

from confluent_kafka import Producer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kafka import KafkaConsumer, TopicPartition

from streamer import events
from streamer.events import FLOAT32_MAX, Message, decode_batch
from streamer.features import default_spec

from ..kafka_helpers import Topics
from .service_helpers import running_service, settings_for

NOW = time.time()
MIN_EVENT_TIME = 946_684_800.0
MAX_KEY_BYTES = 256
REASONS = {v for k, v in vars(events).items() if k.isupper() and isinstance(v, str)} - {
    "MILLIS_THRESHOLD"
}
SERVICE_REASONS = REASONS | {"non_finite_output", "refused_by_broker"}

EXTREME = [0.0, -0.0, 5e-324, 1e-320, 3.4e38, -3.4028234663852886e38, 3.5e38, 1e39,
           1.7976931348623157e308, -1e308, 1e11, -1e11]
numbers = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False, width=64),
    st.sampled_from(EXTREME),
    st.integers(min_value=-(10**40), max_value=10**40),
)
timestamps = st.one_of(
    st.floats(min_value=NOW - 4000, max_value=NOW + 400),
    st.sampled_from([0, -1, -1e300, 1e300, NOW * 1000, (NOW + 86400) * 1000, 1e11, 2**63]),
    st.integers(min_value=-(10**20), max_value=10**20),
    st.sampled_from(["2025-01-01T00:00:00", "2025-01-01T00:00:00+05:00", "yesterday", "",
                     "1970-01-01", "9999-12-31T23:59:59"]),
    st.text(max_size=12),
)
keys = st.one_of(
    st.none(),
    st.text(max_size=12),
    st.text(alphabet=st.characters(min_codepoint=0x80, max_codepoint=0x10FFFF,
                                   exclude_categories=("Cs",)), min_size=1, max_size=8),
    st.integers(min_value=MAX_KEY_BYTES - 2, max_value=MAX_KEY_BYTES * 3).map(lambda n: "k" * n),
    st.just("\ud800"),  # a lone surrogate, escaped by json.dumps
    st.integers(),  # mistyped
)
values = st.one_of(
    st.lists(numbers, min_size=4, max_size=4),
    st.lists(numbers, max_size=6),
    st.lists(st.sampled_from([math.nan, math.inf, -math.inf]), min_size=4, max_size=4),
    st.text(max_size=5),
    st.dictionaries(st.text(max_size=3), numbers, max_size=3),
    st.none(),
)


@st.composite
def payloads(draw: st.DrawFn) -> bytes:
    doc: dict[str, Any] = {}
    if draw(st.booleans()):
        doc["key"] = draw(keys)
    if draw(st.integers(0, 9)):
        doc["ts"] = draw(timestamps)
    if draw(st.integers(0, 9)):
        doc["values"] = draw(values)
    if draw(st.booleans()):
        doc[draw(st.text(max_size=4))] = draw(st.recursive(
            st.none() | st.booleans() | numbers | st.text(max_size=4),
            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                st.text(max_size=3), inner, max_size=3),
            max_leaves=8))
    text = json.dumps(doc)  # NaN/Infinity tokens and \\ud800 escapes included on purpose
    return text.encode()


served_numbers = st.one_of(
    st.floats(min_value=-1e6, max_value=1e6),
    st.sampled_from([3.4e38, -3.4e38, 1e30, 0.0]),  # valid, yet they overflow the scaling
)


@st.composite
def good_events(draw: st.DrawFn) -> bytes:
    """Events that pass decoding, so the engine and the emitter see hostile values too."""
    doc = {
        "key": draw(st.sampled_from(["a", "b", "é", "\u2603", "k" * MAX_KEY_BYTES])),
        "ts": draw(st.floats(min_value=NOW - 600, max_value=NOW + 60)),
        "values": draw(st.lists(served_numbers, min_size=4, max_size=4)),
    }
    return json.dumps(doc).encode()


@st.composite
def raw_values(draw: st.DrawFn) -> bytes | None:
    kind = draw(st.integers(0, 13))
    if kind >= 10:
        return draw(good_events())
    if kind <= 4:
        return draw(payloads())
    if kind == 5:  # truncated JSON
        full = draw(payloads())
        return full[:draw(st.integers(0, max(len(full) - 1, 0)))]
    if kind == 6:  # deep nesting
        depth = draw(st.sampled_from([50, 300, 5000]))
        return b'{"ts": 1, "values": ' + b"[" * depth + b"]" * depth + b"}"
    if kind == 7:
        return draw(st.binary(max_size=64))
    if kind == 8:  # a byte flipped into something that is not UTF-8
        full = bytearray(draw(payloads()))
        full[draw(st.integers(0, len(full) - 1))] = 0xFF
        return bytes(full)
    return None  # tombstone


message_keys = st.one_of(st.none(), st.none(), st.none(), st.binary(max_size=8),
                         st.text(max_size=8).map(lambda s: s.encode()),
                         st.just(b"k" * (MAX_KEY_BYTES + 1)), st.just(b"\xff\xfe"))


def assert_strict_json(value: bytes) -> Any:
    def refuse(token: str) -> Any:
        raise AssertionError(f"not RFC 8259 JSON: {token}")

    doc = json.loads(value, parse_constant=refuse)
    _assert_finite(doc)
    return doc


def _assert_finite(node: Any) -> None:
    if isinstance(node, float):
        assert math.isfinite(node)
    elif isinstance(node, list):
        for item in node:
            _assert_finite(item)
    elif isinstance(node, dict):
        for item in node.values():
            _assert_finite(item)


SPEC = default_spec("generic", n_features=4)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(message_keys, raw_values()), min_size=1, max_size=8))
def test_decoder_sorts_every_message_into_one_good_event_or_one_reason(
    batch: list[tuple[bytes | None, bytes | None]],
) -> None:
    messages = [Message(k, v, 0, i) for i, (k, v) in enumerate(batch)]
    decoded = decode_batch(messages, SPEC, NOW, 300.0, max_past_s=3600.0,
                           min_event_time=MIN_EVENT_TIME, max_key_bytes=MAX_KEY_BYTES)
    bad_index = [i for i, _ in decoded.bad]
    assert sorted(decoded.index + bad_index) == list(range(len(messages)))
    assert {err.reason for _, err in decoded.bad} <= REASONS
    assert decoded.raw.shape == (len(decoded.index), 4)
    if decoded.index:
        assert (abs(decoded.raw) <= FLOAT32_MAX).all()
        assert (decoded.ts >= NOW - 3600).all() and (decoded.ts <= NOW + 300).all()
    for j, key in enumerate(decoded.keys):
        assert 0 < len(key.encode("utf-8")) <= MAX_KEY_BYTES
        # What the service writes for this event is valid JSON.
        json.dumps({"key": key, "ts": decoded.ts_raw[j], "prediction": [0.0]}, allow_nan=False)


class _Outputs:
    """Everything on the output and dead-letter topics, keyed by source (partition, offset)."""

    def __init__(self, topics: Topics) -> None:
        self.topics = topics
        self.consumer = KafkaConsumer(bootstrap_servers=topics.bootstrap, check_crcs=False,
                                      enable_auto_commit=False, fetch_max_wait_ms=10)
        tps = [TopicPartition(t, p) for t in (topics.output, topics.dlq)
               for p in self.consumer.partitions_for_topic(t) or set()]
        self.consumer.assign(tps)
        self.consumer.seek_to_beginning()
        self.seen: dict[tuple[int, int], list[str]] = {}

    def poll(self, expect: set[tuple[int, int]], timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not expect <= set(self.seen) and time.monotonic() < deadline:
            for tp, records in self.consumer.poll(timeout_ms=100).items():
                for r in records:
                    if tp.topic == self.topics.output:
                        doc = assert_strict_json(r.value)
                        source = (doc["partition"], doc["offset"])
                        what = "prediction"
                    else:
                        h = dict(r.headers)
                        source = (int(h["dlq.source.partition"]), int(h["dlq.source.offset"]))
                        what = h["dlq.reason"].decode()
                        assert what in SERVICE_REASONS
                    self.seen.setdefault(source, []).append(what)


def _produce(bootstrap: str, topic: str,
             batch: list[tuple[bytes | None, bytes | None]]) -> set[tuple[int, int]]:
    producer = Producer({"bootstrap.servers": bootstrap, "message.max.bytes": 4_000_000,
                         "linger.ms": 1})
    coords: list[tuple[int, int]] = []

    def delivered(err: Any, msg: Any) -> None:
        assert err is None, err
        coords.append((msg.partition(), msg.offset()))

    for key, value in batch:
        producer.produce(topic, key=key, value=value, on_delivery=delivered)
    assert producer.flush(30) == 0
    assert len(coords) == len(batch)
    return set(coords)


def test_service_path_every_offset_ends_as_one_prediction_or_one_dead_letter(
    topics: Topics, touchy_artifact: Path
) -> None:
    service_settings = settings_for(topics, touchy_artifact, max_past_s=3600.0,
                                    max_key_bytes=MAX_KEY_BYTES)
    big = (b"big", b"x" * 1_100_000)  # over 1 MiB: its dead letter must still fit
    with running_service(service_settings) as service:
        outputs = _Outputs(topics)
        produced: set[tuple[int, int]] = set()
        thread = threading.current_thread()

        @settings(max_examples=12, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(st.lists(st.tuples(message_keys, raw_values()), min_size=1, max_size=10),
               st.booleans())
        def check(batch: list[tuple[bytes | None, bytes | None]], oversized: bool) -> None:
            assert threading.current_thread() is thread
            coords = _produce(topics.bootstrap, topics.input,
                              batch + ([big] if oversized else []))
            produced.update(coords)
            outputs.poll(coords)
            for source in coords:
                assert len(outputs.seen.get(source, [])) == 1, (source, outputs.seen.get(source))
            assert service.health.healthy(30.0), "the loop stopped"

        check()
        outputs.poll(produced, timeout_s=2.0)  # nothing more may arrive for any offset
        outputs.consumer.close()
    assert set(outputs.seen) == produced
    reasons = {w for v in outputs.seen.values() for w in v}
    assert "prediction" in reasons, "the batches must reach the engine, not only the decoder"
    assert all(len(v) == 1 for v in outputs.seen.values())

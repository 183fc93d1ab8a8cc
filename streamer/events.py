"""Input event schemas and decoding: Kafka bytes in, (key, event time, raw vector) out.

Everything that can be wrong with one message is found here, before anything touches a key's
state; a bad message raises :class:`BadEvent` with a stable ``reason`` code that the service
turns into a dead-letter record and a counter.

Event time rule: ``ts`` may be epoch seconds, epoch milliseconds or an ISO-8601 string. A number
whose absolute value is at least 1e11 is milliseconds (1e11 s is the year 5138, 1e11 ms is
1973); anything smaller is seconds. An ISO-8601 string without a zone is UTC. A plausible event
time lies in ``[max(min_event_time, now - max_past_s), now + max_future_s]``; one before that
range is ``bad_timestamp``, one after it ``future_timestamp``.

Numbers must be finite *as float32*, the precision the model computes in: a value beyond
+-3.4e38 (a common "no reading" placeholder is 1.797e308) is ``out_of_range``, refused before any
state is touched. A key (payload or Kafka key) longer than ``max_key_bytes`` UTF-8 bytes is
``key_too_long``: its prediction could not be produced.

Usage::

    batch = decode_batch(messages, spec, now=time.time(), max_future_s=300)
    batch.keys, batch.ts, batch.raw, batch.index   # good events, in input order
    batch.bad                                       # [(index, BadEvent)]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, NamedTuple

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from streamer.errors import BadEvent
from streamer.features import FeatureSpec

MILLIS_THRESHOLD = 1e11

# Reason codes (labels of streamer_dead_letter_total and the dlq.reason header).
NOT_UTF8 = "not_utf8"
NOT_JSON = "not_json"
SCHEMA = "schema"
NON_FINITE = "non_finite"
BAD_TIMESTAMP = "bad_timestamp"
FUTURE_TIMESTAMP = "future_timestamp"
MISSING_KEY = "missing_key"
KEY_MISMATCH = "key_mismatch"
FEATURE_COUNT = "feature_count"
UNKNOWN_READING = "unknown_reading"
MISSING_READING = "missing_reading"
OUT_OF_RANGE = "out_of_range"
KEY_TOO_LONG = "key_too_long"

FLOAT32_MAX = float(np.finfo(np.float32).max)

_STRICT = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore", frozen=True)
Timestamp = float | int | str


class GenericEvent(BaseModel):
    model_config = _STRICT
    key: str | None = None
    ts: Timestamp
    values: list[float]


class TickEvent(BaseModel):
    model_config = _STRICT
    symbol: str | None = None
    ts: Timestamp
    price: float
    size: float
    bid: float | None = None
    ask: float | None = None


class SensorEvent(BaseModel):
    model_config = _STRICT
    sensor_id: str | None = None
    ts: Timestamp
    readings: dict[str, float]


class Message(NamedTuple):
    """One Kafka record as the edge hands it over (no Kafka types leak into the core)."""

    key: bytes | None
    value: bytes | None
    partition: int = 0
    offset: int = 0


class DecodedEvent(NamedTuple):
    key: str
    ts: float  # epoch seconds
    ts_raw: Timestamp  # as the producer sent it; echoed unchanged in the prediction
    raw: list[float]


@dataclass
class DecodedBatch:
    """Good events as arrays (one host->device copy later) plus the bad ones with reasons."""

    keys: list[str]
    ts: np.ndarray  # [N] float64
    ts_raw: list[Timestamp]
    raw: np.ndarray  # [N, R] float64
    index: list[int]  # position of each good event in the input message list
    bad: list[tuple[int, BadEvent]] = field(default_factory=list)


def parse_timestamp(value: Timestamp) -> float:
    """Epoch seconds from seconds, milliseconds (|x| >= 1e11) or ISO-8601; raises BadEvent."""
    if isinstance(value, str):
        try:
            dt = datetime.fromisoformat(value)
        except ValueError as exc:
            raise BadEvent(BAD_TIMESTAMP, f"not ISO-8601: {value!r}") from exc
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=timezone.utc)
        return dt.timestamp()
    try:
        seconds = float(value) / 1000.0 if abs(value) >= MILLIS_THRESHOLD else float(value)
    except OverflowError as exc:  # a JSON integer with hundreds of digits
        raise BadEvent(BAD_TIMESTAMP, f"ts does not fit a float: {str(value)[:32]}...") from exc
    if not math.isfinite(seconds):
        raise BadEvent(NON_FINITE, f"ts is not finite: {value!r}")
    return seconds


_SCHEMAS: dict[str, type[GenericEvent] | type[TickEvent] | type[SensorEvent]] = {
    "generic": GenericEvent,
    "tick": TickEvent,
    "sensor": SensorEvent,
}


def _validate(value: bytes, kind: str) -> Any:
    try:
        return _SCHEMAS[kind].model_validate_json(value)
    except ValidationError as exc:
        raise _classify(exc, value) from exc


def _classify(exc: ValidationError, value: bytes) -> BadEvent:
    errors = exc.errors(include_url=False)
    first = errors[0]
    if first["type"] == "json_invalid":
        try:
            value.decode("utf-8")
        except UnicodeDecodeError:
            return BadEvent(NOT_UTF8, "message value is not valid UTF-8")
        return BadEvent(NOT_JSON, first["msg"])
    for err in errors:
        if err["type"] == "finite_number":
            return BadEvent(NON_FINITE, f"{_loc(err['loc'])} is NaN or infinite")
    detail = "; ".join(f"{_loc(e['loc'])}: {e['msg']}" for e in errors[:3])
    return BadEvent(SCHEMA, detail)


def _loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "value"


def _resolve_key(
    payload_key: str | None, message_key: bytes | None, max_key_bytes: int | None = None
) -> str:
    kafka_key: str | None = None
    if message_key is not None:
        if max_key_bytes is not None and len(message_key) > max_key_bytes:
            raise BadEvent(KEY_TOO_LONG, f"message key is {len(message_key)} bytes, "
                           f"the limit is {max_key_bytes}")
        try:
            kafka_key = message_key.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadEvent(NOT_UTF8, "message key is not valid UTF-8") from exc
    if payload_key is not None and kafka_key is not None and payload_key != kafka_key:
        raise BadEvent(KEY_MISMATCH, f"payload key {payload_key!r} != message key {kafka_key!r}")
    key = payload_key if payload_key is not None else kafka_key
    if not key:
        raise BadEvent(MISSING_KEY, "no key in the payload and no message key")
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError as exc:  # a lone surrogate escaped in JSON ("\ud800")
        raise BadEvent(NOT_UTF8, "key is not valid Unicode (lone surrogate)") from exc
    if max_key_bytes is not None and size > max_key_bytes:
        raise BadEvent(KEY_TOO_LONG, f"key is {size} bytes, the limit is {max_key_bytes}")
    return key


def _check_float32(raw: list[float]) -> None:
    """Finite in float64 is not enough: the model computes in float32."""
    for i, v in enumerate(raw):
        if abs(v) > FLOAT32_MAX:  # NaN (an absent tick quote) compares False and passes
            raise BadEvent(OUT_OF_RANGE, f"value {i} = {v!r} overflows float32 (|x| > 3.4e38)")


def _raw_vector(event: Any, spec: FeatureSpec) -> tuple[str | None, list[float]]:
    if spec.kind == "generic":
        if len(event.values) != spec.n_features:
            raise BadEvent(
                FEATURE_COUNT, f"expected {spec.n_features} values, got {len(event.values)}"
            )
        return event.key, event.values
    if spec.kind == "tick":
        if event.price <= 0 or event.size < 0:
            raise BadEvent(
                OUT_OF_RANGE, f"price must be > 0 and size >= 0: {event.price}, {event.size}"
            )
        nan = float("nan")
        bid = nan if event.bid is None else event.bid
        ask = nan if event.ask is None else event.ask
        return event.symbol, [event.price, event.size, bid, ask]
    readings: dict[str, float] = event.readings
    unknown = sorted(set(readings) - set(spec.names))
    if unknown:
        raise BadEvent(UNKNOWN_READING, f"unknown readings {unknown}; expected {list(spec.names)}")
    missing = [n for n in spec.names if n not in readings]
    if missing:
        raise BadEvent(MISSING_READING, f"missing readings {missing}")
    return event.sensor_id, [readings[n] for n in spec.names]


def decode(
    value: bytes | None,
    key: bytes | None,
    spec: FeatureSpec,
    now: float,
    max_future_s: float = 300.0,
    *,
    max_past_s: float | None = None,
    min_event_time: float | None = None,
    max_key_bytes: int | None = None,
) -> DecodedEvent:
    """Decode and validate one message against the serving model's feature spec.

    ``now``, ``min_event_time`` in epoch seconds; ``max_future_s``/``max_past_s`` in seconds
    (None: no bound). Raises BadEvent with a reason code (module constants)."""
    if value is None:
        raise BadEvent(NOT_JSON, "message has no value (tombstone)")
    event = _validate(value, spec.kind)
    payload_key, raw = _raw_vector(event, spec)
    _check_float32(raw)
    ts = parse_timestamp(event.ts)
    if ts > now + max_future_s:
        raise BadEvent(FUTURE_TIMESTAMP, f"event time {ts:.3f} is {ts - now:.0f}s in the future")
    if min_event_time is not None and ts < min_event_time:
        raise BadEvent(BAD_TIMESTAMP, f"event time {ts:.6g} is before {min_event_time:.0f} "
                       "(min_event_time)")
    if max_past_s is not None and ts < now - max_past_s:
        raise BadEvent(BAD_TIMESTAMP, f"event time {ts:.6g} is {now - ts:.0f}s in the past "
                       f"(max_past_s is {max_past_s:.0f})")
    return DecodedEvent(_resolve_key(payload_key, key, max_key_bytes), ts, event.ts, raw)


def decode_batch(
    messages: Sequence[Message],
    spec: FeatureSpec,
    now: float,
    max_future_s: float = 300.0,
    *,
    max_past_s: float | None = None,
    min_event_time: float | None = None,
    max_key_bytes: int | None = None,
) -> DecodedBatch:
    """:func:`decode` over ``messages``: good events as arrays, bad ones with their index."""
    keys: list[str] = []
    ts: list[float] = []
    ts_raw: list[Timestamp] = []
    raws: list[list[float]] = []
    index: list[int] = []
    bad: list[tuple[int, BadEvent]] = []
    for i, msg in enumerate(messages):
        try:
            ev = decode(msg.value, msg.key, spec, now, max_future_s, max_past_s=max_past_s,
                        min_event_time=min_event_time, max_key_bytes=max_key_bytes)
        except BadEvent as exc:
            bad.append((i, exc))
            continue
        keys.append(ev.key)
        ts.append(ev.ts)
        ts_raw.append(ev.ts_raw)
        raws.append(ev.raw)
        index.append(i)
    raw = np.asarray(raws, dtype=np.float64).reshape(len(raws), spec.raw_width)
    return DecodedBatch(keys, np.asarray(ts, dtype=np.float64), ts_raw, raw, index, bad)

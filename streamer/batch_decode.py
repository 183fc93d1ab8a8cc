"""Decoding a whole poll batch at once: the fast path of :func:`streamer.events.decode_batch`.

Same contract and same results as the per-message reference (``streamer.events.decode_batch``):
the same good events (key, event time, raw time value, raw vector) in input order and the same
bad events with the same reason and detail. It gets there with one ``orjson.loads`` per message
(no pydantic model per event), the numbers checked as numpy columns (feature count, finite,
float32 range, timestamp bounds), and per-event Python only for what has no column form (the
key). Any message the fast path is not certain about (it does not parse, a field has an
unexpected type, a number is out of range, a key is missing or mismatched, a timestamp falls
outside the window...) is handed to the reference :func:`streamer.events.decode` instead, so
every bad event's reason and detail come from one place. tests/streamer/test_batch_decode.py
proves fast == reference over random valid and hostile batches of all three event kinds.

Why orjson's parse can stand in for pydantic's: for a message orjson accepts, pydantic's strict
JSON parse gives the same values (both RFC 8259, correctly rounded floats, last duplicate field
wins). Where they differ, the message goes to the reference: a time value beyond 2**63 (orjson
turns integers beyond 64 bits into floats, pydantic keeps ints, and the raw time value is echoed
in the prediction), booleans where numbers are expected, non-string keys.

Usage::

    batch = decode_batch_fast(messages, spec, now=time.time(), max_future_s=300)
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from itertools import chain
from typing import Any

import numpy as np
import orjson

from streamer.errors import BadEvent
from streamer.events import (
    FLOAT32_MAX,
    MILLIS_THRESHOLD,
    DecodedBatch,
    Message,
    Timestamp,
    decode,
    decode_batch,
    parse_timestamp,
)
from streamer.features import FeatureSpec

SMALL_BATCH = 8  # below this, the per-batch cost (~50 us) beats per-message pydantic (~7 us)
_NUMBER = (float, int)
_BIG = float(2**63)  # a time value beyond: orjson and pydantic may disagree on int vs float
_KEY_FIELD = {"generic": "key", "tick": "symbol", "sensor": "sensor_id"}


def decode_batch_fast(
    messages: Sequence[Message],
    spec: FeatureSpec,
    now: float,
    max_future_s: float = 300.0,
    *,
    max_past_s: float | None = None,
    min_event_time: float | None = None,
    max_key_bytes: int | None = None,
    min_batch: int = SMALL_BATCH,
) -> DecodedBatch:
    """:func:`streamer.events.decode_batch`, batched: arguments, units and results are the
    same (good events as arrays in input order, bad ones as ``(index, BadEvent)``). A batch of
    fewer than ``min_batch`` messages goes to the reference whole (cheaper at light load)."""
    if len(messages) < min_batch:
        return decode_batch(messages, spec, now, max_future_s, max_past_s=max_past_s,
                            min_event_time=min_event_time, max_key_bytes=max_key_bytes)
    docs = _parse(messages)
    columns = _columns(messages, docs, spec, max_key_bytes)
    idx, keys, ts_raw, raw = columns or _candidates(messages, docs, spec, max_key_bytes)
    ts = _seconds(ts_raw)
    ok = np.isfinite(ts) & (ts <= now + max_future_s)
    if min_event_time is not None:
        ok &= ts >= min_event_time
    if max_past_s is not None:
        ok &= ts >= now - max_past_s
    raw_arr = np.asarray(raw, dtype=np.float64).reshape(len(idx), spec.raw_width)
    mag = np.abs(raw_arr)
    ok &= ~(mag > FLOAT32_MAX).any(axis=1)  # NaN compares False: an absent tick quote passes
    if spec.kind == "tick":
        ok &= (raw_arr[:, 0] > 0) & (raw_arr[:, 1] >= 0)
    n = len(messages)
    fast = np.zeros(n, dtype=bool)
    fast[np.asarray(idx, dtype=np.int64)[ok]] = True
    if fast.all():
        return DecodedBatch(keys, ts, ts_raw, raw_arr, list(range(n)), [])
    return _merge(messages, spec, now, max_future_s, max_past_s, min_event_time, max_key_bytes,
                  fast, ok, idx, keys, ts, ts_raw, raw_arr)


def _parse(messages: Sequence[Message]) -> list[Any]:
    """orjson's parse of each value; None where it fails (the reference decides why)."""
    loads = orjson.loads
    try:
        return [loads(m.value) for m in messages]  # type: ignore[arg-type]
    except (orjson.JSONDecodeError, TypeError):
        pass
    docs: list[Any] = []
    for m in messages:
        try:
            docs.append(loads(m.value))  # type: ignore[arg-type]
        except (orjson.JSONDecodeError, TypeError):
            docs.append(None)
    return docs


def _columns(
    messages: Sequence[Message], docs: list[Any], spec: FeatureSpec, max_key_bytes: int | None
) -> tuple[list[int], list[str], list[Timestamp], np.ndarray] | None:
    """:func:`_candidates` for the common batch, a column at a time in C-level loops: every
    message parsed to an object with fields of the right types, keys in the message key (and
    equal to the payload's, when it has one). None when any of that does not hold."""
    n = len(docs)
    if not n or set(map(type, docs)) != {dict}:
        return None
    ts_raw = [d.get("ts") for d in docs]
    if not set(map(type, ts_raw)) <= {float, int, str}:
        return None
    # A JSON boolean is the token true or false: without either in the bytes, every number
    # below is a float or an int (array("d") refuses strings, nulls and lists, not booleans).
    joined = b"".join(m.value for m in messages)  # type: ignore[misc]
    if b"true" in joined or b"false" in joined:
        return None
    raw = _raw_columns(docs, spec)
    if raw is None:
        return None
    message_keys: list[Any] = [m.key for m in messages]
    if None in message_keys:
        return None
    if max_key_bytes is not None and max(map(len, message_keys)) > max_key_bytes:
        return None
    try:
        keys = [k.decode("utf-8") for k in message_keys]
    except UnicodeDecodeError:
        return None
    if "" in keys:
        return None
    payload = [d.get(_KEY_FIELD[spec.kind]) for d in docs]
    if payload != keys and payload.count(None) != n:
        return None
    return list(range(n)), keys, ts_raw, raw


def _raw_columns(docs: list[Any], spec: FeatureSpec) -> np.ndarray | None:
    """[N, R] raw vectors when every event's numbers are where they should be and no number is
    a string, a null or a list (the caller has ruled out booleans)."""
    n, width = len(docs), spec.raw_width
    if spec.kind == "tick":
        price, size = [d.get("price") for d in docs], [d.get("size") for d in docs]
        bid, ask = [d.get("bid") for d in docs], [d.get("ask") for d in docs]
        quotes = {float, int, type(None)}
        if not (set(map(type, bid)) <= quotes and set(map(type, ask)) <= quotes):
            return None
        try:
            flat = array("d", price + size)
        except TypeError:
            return None
        levels = np.frombuffer(flat, dtype=np.float64).reshape(2, n)
        return np.column_stack([levels.T, np.array([bid, ask], dtype=np.float64).T])
    if spec.kind == "generic":
        rows = [d.get("values") for d in docs]
        if set(map(type, rows)) != {list} or set(map(len, rows)) != {width}:
            return None
        values = chain.from_iterable(rows)
    else:
        readings = [d.get("readings") for d in docs]
        if set(map(type, readings)) != {dict} or set(map(len, readings)) != {width}:
            return None
        values = chain.from_iterable([r.get(name) for name in spec.names] for r in readings)
    try:
        flat = array("d", list(values))  # a missing reading is None: refused
    except TypeError:
        return None
    return np.frombuffer(flat, dtype=np.float64).reshape(n, width)


def _candidates(
    messages: Sequence[Message], docs: list[Any], spec: FeatureSpec, max_key_bytes: int | None
) -> tuple[list[int], list[str], list[Timestamp], list[Any]]:
    """Messages whose fields have the right types and whose key resolves: their index, key,
    raw time value and raw vector (a list per event, or one flat list for generic)."""
    idx: list[int] = []
    keys: list[str] = []
    ts_raw: list[Timestamp] = []
    raws: list[Any] = []
    key_field, kind, names = _KEY_FIELD[spec.kind], spec.kind, spec.names
    width = spec.raw_width
    nan = float("nan")
    limit = max_key_bytes
    for i, (msg, doc) in enumerate(zip(messages, docs, strict=True)):
        if type(doc) is not dict:
            continue
        t: Any = doc.get("ts")
        tt = type(t)
        if tt is not float and tt is not int and tt is not str:
            continue
        if kind == "generic":
            row = doc.get("values")
            if type(row) is not list or len(row) != width:
                continue
        elif kind == "tick":
            price, size = doc.get("price"), doc.get("size")
            bid, ask = doc.get("bid"), doc.get("ask")
            if (type(price) not in _NUMBER or type(size) not in _NUMBER
                    or (bid is not None and type(bid) not in _NUMBER)
                    or (ask is not None and type(ask) not in _NUMBER)):
                continue
            row = [price, size, nan if bid is None else bid, nan if ask is None else ask]
        else:
            readings = doc.get("readings")
            if type(readings) is not dict or len(readings) != width:
                continue
            try:
                row = [readings[name] for name in names]
            except KeyError:
                continue
        # the key (see streamer.events._resolve_key)
        pk = doc.get(key_field)
        mk = msg.key
        if mk is None:
            if type(pk) is not str or not pk:
                continue
            if limit is not None:
                try:
                    if len(pk.encode("utf-8")) > limit:
                        continue
                except UnicodeEncodeError:
                    continue
            key = pk
        else:
            if limit is not None and len(mk) > limit:
                continue
            try:
                key = mk.decode("utf-8")
            except UnicodeDecodeError:
                continue
            if not key or (pk is not None and pk != key):
                continue
        idx.append(i)
        keys.append(key)
        ts_raw.append(t)
        raws.append(row)
    if raws:
        flat = list(chain.from_iterable(raws))
        types = set(map(type, flat))
        if not types <= {float, int}:
            keep = [j for j, row in enumerate(raws) if all(type(v) in _NUMBER for v in row)]
            idx = [idx[j] for j in keep]
            keys = [keys[j] for j in keep]
            ts_raw = [ts_raw[j] for j in keep]
            raws = [raws[j] for j in keep]
            flat = list(chain.from_iterable(raws))
        return idx, keys, ts_raw, flat
    return idx, keys, ts_raw, []


def _seconds(ts_raw: list[Timestamp]) -> np.ndarray:
    """Epoch seconds per raw time value (see :func:`streamer.events.parse_timestamp`); NaN
    where the reference must decide (a string that does not parse, a number beyond 2**63)."""
    if str in set(map(type, ts_raw)):  # ISO-8601 strings: one at a time
        values = np.empty(len(ts_raw), dtype=np.float64)
        for j, t in enumerate(ts_raw):
            if isinstance(t, str):
                values[j] = _iso(t)
            elif abs(t) >= _BIG:
                values[j] = np.nan
            else:
                values[j] = float(t) / 1000.0 if abs(t) >= MILLIS_THRESHOLD else float(t)
        return values
    values = np.asarray(ts_raw, dtype=np.float64)
    mag = np.abs(values)
    return np.where(mag >= _BIG, np.nan, np.where(mag >= MILLIS_THRESHOLD, values / 1000.0,
                                                   values))


def _iso(t: str) -> float:
    try:
        return parse_timestamp(t)
    except BadEvent:
        return float("nan")


def _merge(
    messages: Sequence[Message], spec: FeatureSpec, now: float, max_future_s: float,
    max_past_s: float | None, min_event_time: float | None, max_key_bytes: int | None,
    fast: np.ndarray, ok: np.ndarray, idx: list[int], keys: list[str], ts: np.ndarray,
    ts_raw: list[Timestamp], raw: np.ndarray,
) -> DecodedBatch:
    """Fast rows plus the reference's verdict on every other message, in input order."""
    position = {idx[j]: j for j in np.flatnonzero(ok).tolist()}  # message -> candidate
    out_keys: list[str] = []
    out_ts: list[float] = []
    out_ts_raw: list[Timestamp] = []
    out_raw: list[np.ndarray] = []
    index: list[int] = []
    bad: list[tuple[int, BadEvent]] = []
    for i, msg in enumerate(messages):
        if fast[i]:
            j = position[i]
            out_keys.append(keys[j])
            out_ts.append(float(ts[j]))
            out_ts_raw.append(ts_raw[j])
            out_raw.append(raw[j])
        else:
            try:
                ev = decode(msg.value, msg.key, spec, now, max_future_s, max_past_s=max_past_s,
                            min_event_time=min_event_time, max_key_bytes=max_key_bytes)
            except BadEvent as exc:
                bad.append((i, exc))
                continue
            out_keys.append(ev.key)
            out_ts.append(ev.ts)
            out_ts_raw.append(ev.ts_raw)
            out_raw.append(np.asarray(ev.raw, dtype=np.float64))
        index.append(i)
    raw_out = (np.stack(out_raw) if out_raw else np.zeros((0, spec.raw_width)))
    return DecodedBatch(out_keys, np.asarray(out_ts, dtype=np.float64), out_ts_raw,
                        raw_out.reshape(len(out_keys), spec.raw_width), index, bad)

"""The changelog's binary record format: one key's whole slot, and the checkpoint marker.

A state record holds every tensor a key's slot keeps in :class:`streamer.state.StateStore`
(h and c of every layer, the previous raw observation and its time, the per-key normalization
statistics and event count, the re-warm window and its ring position), the key's last-seen
time (for the TTL) and the version of the model that produced h and c. Layout (little endian)::

    magic "LSTS" | format u8 | crc32 u32 of everything after it |
    dims L H R C W F (u32 each) | last_seen f64 | len u16 + model version (UTF-8) | payload

payload: h [L, H] f32 | c [L, H] f32 | prev_raw [R] f64 | prev_ts f64 | has_prev u8 |
stats [C, 3] f64 | count f64 | win [W, F] f32 | win_next i64 | win_len i64.

A marker (magic "LSTM", format u8, input offset i64, wall time f64) closes a checkpoint of
one partition: every state record before it in the changelog partition covers the input up to
(not including) that offset. No JSON and no pickle: the decoder reads numbers only, and a record
that fails its CRC, magic, format or shape check raises :class:`CorruptStateRecord`.

Source: project format; the "records, then a marker per partition" scheme follows Kafka
Streams' changelog + checkpoint file and Flink's checkpoint barrier.
"""

from __future__ import annotations

import functools
import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from streamer.state import LAYER_TENSORS, ROW_TENSORS, StateStore

FORMAT_VERSION = 1
STATE_MAGIC = b"LSTS"
MARKER_MAGIC = b"LSTM"
MARKER_KEY = b"\x00checkpoint"  # never a decoded event key (those are printable UTF-8)
MARKER_HEADER = ("streamer.checkpoint", b"marker")
_HEAD = struct.Struct("<4sBI")  # magic, format, crc32
_DIMS = struct.Struct("<6Id")  # L H R C W F, last_seen
_MARKER = struct.Struct("<4sBqd")


class CorruptStateRecord(ValueError):
    """A changelog record that cannot be decoded (truncated, bad CRC, unknown format)."""


@dataclass(frozen=True)
class Dims:
    layers: int
    hidden: int
    raw: int
    stat: int
    window: int
    features: int

    @classmethod
    def of(cls, store: StateStore) -> Dims:
        return cls(store.h.shape[0], store.h.shape[2], store.prev_raw.shape[1],
                   store.stats.shape[1], store.win.shape[1], store.win.shape[2])

    def fields(self) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
        """(name, dtype, per-key shape) in payload order."""
        f4, f8, i8 = np.dtype("<f4"), np.dtype("<f8"), np.dtype("<i8")
        return [
            ("h", f4, (self.layers, self.hidden)), ("c", f4, (self.layers, self.hidden)),
            ("prev_raw", f8, (self.raw,)), ("prev_ts", f8, ()), ("has_prev", np.dtype("u1"), ()),
            ("stats", f8, (self.stat, 3)), ("count", f8, ()),
            ("win", f4, (self.window, self.features)), ("win_next", i8, ()), ("win_len", i8, ()),
        ]

    def payload_bytes(self) -> int:
        return _payload_bytes(self)


@functools.lru_cache(maxsize=16)
def _payload_bytes(dims: Dims) -> int:
    return sum(dt.itemsize * math.prod(shape) for _, dt, shape in dims.fields())


@dataclass
class DecodedStates:
    """Decoded records of several keys: ``tensors[name]`` is [K, ...] (numpy, host)."""

    keys: list[str]
    versions: list[str]
    last_seen: np.ndarray  # [K] epoch seconds
    tensors: dict[str, np.ndarray]


def _slot_tensors(store: StateStore, slots: torch.Tensor) -> dict[str, np.ndarray]:
    """Host copies of ``slots``' state, [K, ...] each in its record dtype (h and c moved to
    key-major)."""
    dtypes = {name: dtype for name, dtype, _ in Dims.of(store).fields()}
    out = {name: getattr(store, name)[:, slots].transpose(0, 1) for name in LAYER_TENSORS}
    out.update((name, getattr(store, name)[slots]) for name in ROW_TENSORS)
    return {name: t.cpu().numpy().astype(dtypes[name], copy=False) for name, t in out.items()}


def encode_states(
    store: StateStore, keys: list[str], version: str, last_seen: np.ndarray
) -> list[bytes]:
    """One state record per key (all keys must be resident). One device->host copy per tensor;
    the per-key work is one join and one CRC."""
    if not keys:
        return []
    dims = Dims.of(store)
    slots_np = np.asarray([store._slot_of[k] for k in keys], dtype=np.int64)
    tensors = _slot_tensors(store, torch.from_numpy(slots_np).to(store.device))
    columns = [
        np.ascontiguousarray(tensors[name].astype(dt, copy=False)).reshape(len(keys), -1)
        .view(np.uint8)
        for name, dt, _ in dims.fields()
    ]
    payload = np.concatenate(columns, axis=1)  # [K, payload_bytes]
    vbytes = version.encode()
    out: list[bytes] = []
    for i in range(len(keys)):
        body = (_DIMS.pack(dims.layers, dims.hidden, dims.raw, dims.stat, dims.window,
                           dims.features, float(last_seen[i]))
                + struct.pack("<H", len(vbytes)) + vbytes + payload[i].tobytes())
        out.append(_HEAD.pack(STATE_MAGIC, FORMAT_VERSION, zlib.crc32(body)) + body)
    return out


@functools.lru_cache(maxsize=16)
def _shape(dims: Dims) -> tuple[int, ...]:
    return (dims.layers, dims.hidden, dims.raw, dims.stat, dims.window, dims.features)


def decode_state(value: bytes, dims: Dims) -> tuple[str, float, memoryview]:
    """(model version, last_seen, payload view) of one record whose shape matches ``dims``.

    Raises CorruptStateRecord for a truncated record, a bad magic, format or CRC, or a shape
    other than ``dims`` (a state written for another state layout cannot be used)."""
    if len(value) < _HEAD.size + _DIMS.size + 2:
        raise CorruptStateRecord(f"truncated: {len(value)} bytes")
    magic, fmt, crc = _HEAD.unpack_from(value)
    if magic != STATE_MAGIC:
        raise CorruptStateRecord(f"bad magic {magic!r}")
    if fmt != FORMAT_VERSION:
        raise CorruptStateRecord(f"unknown format version {fmt}")
    body = memoryview(value)[_HEAD.size:]
    if zlib.crc32(body) != crc:
        raise CorruptStateRecord("CRC mismatch")
    *shape, last_seen = _DIMS.unpack_from(body)
    expected = _shape(dims)
    if tuple(shape) != expected:
        raise CorruptStateRecord(f"state shape {tuple(shape)} differs from this store's "
                                 f"{expected}")
    (vlen,) = struct.unpack_from("<H", body, _DIMS.size)
    start = _DIMS.size + 2
    version = str(body[start:start + vlen], "utf-8", "replace")
    payload = body[start + vlen:]
    if len(payload) != _payload_bytes(dims):
        raise CorruptStateRecord(f"payload of {len(payload)} bytes, expected "
                                 f"{dims.payload_bytes()}")
    return version, float(last_seen), payload


def split_payloads(keys: list[str], versions: list[str], last_seen: list[float],
                   payloads: Sequence[bytes | memoryview], dims: Dims) -> DecodedStates:
    """Stack decoded payloads into [K, ...] arrays (one frombuffer for all keys)."""
    raw = np.frombuffer(b"".join(payloads), dtype=np.uint8).reshape(len(payloads), -1)
    tensors: dict[str, np.ndarray] = {}
    at = 0
    for name, dt, shape in dims.fields():
        width = dt.itemsize * int(np.prod(shape))
        column = np.frombuffer(raw[:, at:at + width].tobytes(), dtype=dt)
        tensors[name] = column.reshape(len(payloads), *shape).copy()
        at += width
    return DecodedStates(keys, versions, np.asarray(last_seen, dtype=np.float64), tensors)


def write_states(store: StateStore, slots: torch.Tensor, states: DecodedStates) -> None:
    """Put decoded states into ``slots`` (device int64 [K]), the inverse of encode_states."""
    t, dev = states.tensors, store.device

    def put(name: str, dtype: torch.dtype) -> torch.Tensor:
        return torch.from_numpy(t[name]).to(device=dev, dtype=dtype)

    for name in LAYER_TENSORS:
        tensor = getattr(store, name)
        tensor[:, slots] = put(name, tensor.dtype).transpose(0, 1)
    for name in ROW_TENSORS:
        tensor = getattr(store, name)
        tensor[slots] = put(name, tensor.dtype)


def encode_marker(offset: int, wall_time: float) -> bytes:
    """A checkpoint marker: the input offset (next to process) the checkpoint covers."""
    return _MARKER.pack(MARKER_MAGIC, FORMAT_VERSION, offset, wall_time)


def decode_marker(value: bytes) -> int:
    """The input offset of a marker; CorruptStateRecord when it is not one."""
    if len(value) != _MARKER.size:
        raise CorruptStateRecord(f"marker of {len(value)} bytes, expected {_MARKER.size}")
    magic, fmt, offset, _ = _MARKER.unpack(value)
    if magic != MARKER_MAGIC or fmt != FORMAT_VERSION:
        raise CorruptStateRecord(f"bad marker magic {magic!r} or format {fmt}")
    return int(offset)

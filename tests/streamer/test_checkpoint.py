"""The changelog record codec: every tensor of a slot round-trips bit for bit; anything that is
not a record of this format and shape is refused with CorruptStateRecord."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamer.checkpoint import (
    CorruptStateRecord,
    Dims,
    decode_marker,
    decode_state,
    encode_marker,
    encode_states,
    split_payloads,
    write_states,
)
from streamer.engine import Engine
from streamer.features import default_spec
from streamer.state import LAYER_TENSORS, ROW_TENSORS, StateStore

from .conftest import make_model


def _warm_store() -> tuple[StateStore, list[str]]:
    # Per-key normalization on, so the statistics slots hold values worth round-tripping.
    model = make_model(spec=default_spec("generic", n_features=4, half_life=6.0), seed=3)
    store = StateStore.for_model(model, capacity=64, window=8)
    engine = Engine(model, store)
    rng = np.random.default_rng(0)
    keys = [f"k{i % 9}" for i in range(60)]
    engine.process(keys, [i % 4 for i in range(60)], rng.normal(size=(60, 4)),
                   1000.0 + np.arange(60, dtype=np.float64), 5.0)
    assert store.stats.any() and store.count.any()
    return store, sorted(set(keys))


def test_every_slot_tensor_round_trips_exactly() -> None:
    store, keys = _warm_store()
    records = encode_states(store, keys, "v-7", store.last_seen(keys))
    dims = Dims.of(store)
    assert all(len(r) == len(records[0]) for r in records)
    decoded = [decode_state(r, dims) for r in records]
    assert {v for v, _, _ in decoded} == {"v-7"}
    states = split_payloads(keys, [v for v, _, _ in decoded], [s for _, s, _ in decoded],
                            [p for _, _, p in decoded], dims)
    target = StateStore(dims.layers, dims.hidden, dims.raw, dims.features, 64, dims.window,
                        stat_width=dims.stat)
    slots, _, _ = target.assign(keys, [0] * len(keys), 0.0)
    write_states(target, torch.from_numpy(slots), states)
    src = torch.tensor([store.slot(k) for k in keys])
    dst = torch.from_numpy(slots)
    for name in LAYER_TENSORS:
        assert torch.equal(getattr(target, name)[:, dst], getattr(store, name)[:, src]), name
    for name in ROW_TENSORS:
        assert torch.equal(getattr(target, name)[dst], getattr(store, name)[src]), name
    np.testing.assert_array_equal(states.last_seen, store.last_seen(keys))


def test_the_record_holds_every_state_tensor_of_the_store() -> None:
    """A state tensor added to the store without a place in the record would not survive a
    restore: the record's fields are exactly the store's per-slot tensors, in this order."""
    store, _ = _warm_store()
    assert [name for name, _, _ in Dims.of(store).fields()] == [*LAYER_TENSORS, *ROW_TENSORS]


def test_corrupt_records_are_refused_with_a_typed_error() -> None:
    store, keys = _warm_store()
    good = encode_states(store, keys[:1], "v", np.zeros(1))[0]
    dims = Dims.of(store)
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x40
    other_shape = Dims(dims.layers, dims.hidden + 1, dims.raw, dims.stat, dims.window,
                       dims.features)
    for bad, why in [(bytes(flipped), "CRC"), (good[:20], "truncated"),
                     (b"XXXX" + good[4:], "magic"), (good[:4] + b"\x09" + good[5:], "format"),
                     (b"", "truncated")]:
        with pytest.raises(CorruptStateRecord, match=why):
            decode_state(bad, dims)
    with pytest.raises(CorruptStateRecord, match="shape"):
        decode_state(good, other_shape)


def test_marker_round_trips_and_rejects_other_bytes() -> None:
    assert decode_marker(encode_marker(123_456_789_012, 1.5)) == 123_456_789_012
    with pytest.raises(CorruptStateRecord):
        decode_marker(b"not a marker")
    with pytest.raises(CorruptStateRecord):
        decode_marker(b"LSTS" + encode_marker(1, 0.0)[4:])

"""The state store decides which key owns which slot of the preallocated tensors; a wrong slot
means one key silently continues another key's hidden state. These tests pin the slot map's
verbs (assign, evict, release, reset) and the feature ring buffer the hot swap re-warms from."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from streamer.engine import Engine
from streamer.features import default_spec
from streamer.state import StateStore

from .conftest import make_model


def _store(capacity: int = 4, ttl_s: float | None = None, window: int = 4) -> StateStore:
    return StateStore(layers=2, hidden=3, raw_width=2, n_features=2, capacity=capacity,
                      window=window, ttl_s=ttl_s)


# --- assign ------------------------------------------------------------------------------------


def test_assign_new_keys_gets_distinct_slots_flagged_new() -> None:
    store = _store(capacity=4)
    slots, is_new, evicted = store.assign(["a", "b", "c"], [0, 1, 2], now=1.0)
    assert slots.dtype == np.int64 and is_new.dtype == bool
    assert len(set(slots.tolist())) == 3 and all(0 <= s < 4 for s in slots)
    assert is_new.tolist() == [True, True, True] and evicted == 0
    assert len(store) == 3 and "a" in store and "z" not in store
    assert [store.slot(k) for k in "abc"] == slots.tolist()
    assert [store.partition_of(k) for k in "abc"] == [0, 1, 2]
    assert store.slot("z") is None and store.partition_of("z") is None


def test_assign_known_keys_returns_stable_slots() -> None:
    store = _store(capacity=4)
    first, _, _ = store.assign(["a", "b"], [0, 0], now=1.0)
    again, is_new, evicted = store.assign(["b", "c", "a"], [0, 0, 0], now=2.0)
    assert again[0] == first[1] and again[2] == first[0]
    assert is_new.tolist() == [False, True, False] and evicted == 0
    assert again[1] not in first


def test_assign_records_the_latest_partition_of_a_key() -> None:
    store = _store()
    store.assign(["a"], [3], now=1.0)
    store.assign(["a"], [5], now=2.0)
    assert store.partition_of("a") == 5


def test_live_slots_lists_every_resident_slot() -> None:
    store = _store(capacity=4)
    slots, _, _ = store.assign(["a", "b", "c"], [0, 0, 0], now=1.0)
    assert sorted(store.live_slots().tolist()) == sorted(slots.tolist())


def test_lru_eviction_at_capacity_evicts_least_recently_used() -> None:
    store = _store(capacity=3)
    slots, _, _ = store.assign(["a", "b", "c"], [0, 0, 0], now=1.0)
    slot_b = int(slots[1])
    store.assign(["a"], [0], now=2.0)  # touching "a" protects it; "b" is now the oldest
    new, is_new, evicted = store.assign(["d"], [0], now=3.0)
    assert evicted == 1 and is_new.tolist() == [True]
    assert "b" not in store and all(k in store for k in "acd")
    assert int(new[0]) == slot_b  # the victim's slot is reused
    _, _, evicted = store.assign(["e"], [0], now=4.0)
    assert evicted == 1 and "c" not in store and "a" in store


@pytest.mark.parametrize("order", [["a", "d"], ["d", "a"]])
def test_lru_eviction_never_picks_a_key_of_the_same_call(order: list[str]) -> None:
    store = _store(capacity=3)
    store.assign(["a", "b", "c"], [0, 0, 0], now=1.0)  # "a" is the least recently used
    slot_a = store.slot("a")
    slots, is_new, evicted = store.assign(order, [0, 0], now=2.0)
    assert evicted == 1
    assert "a" in store and store.slot("a") == slot_a and "b" not in store
    assert dict(zip(order, is_new.tolist(), strict=True)) == {"a": False, "d": True}


def test_assign_of_a_full_batch_of_new_keys_evicts_every_old_key() -> None:
    store = _store(capacity=3)
    old, _, _ = store.assign(["a", "b", "c"], [0, 0, 0], now=1.0)
    new, is_new, evicted = store.assign(["x", "y", "z"], [1, 1, 1], now=2.0)
    assert evicted == 3 and is_new.all() and len(store) == 3
    assert sorted(new.tolist()) == sorted(old.tolist())
    assert not any(k in store for k in "abc")


def test_too_many_distinct_keys_in_one_call_raises() -> None:
    store = _store(capacity=2)
    with pytest.raises(ValueError, match="exceed capacity"):
        store.assign(["a", "b", "c"], [0, 0, 0], now=1.0)
    assert len(store) == 0  # nothing half-assigned
    store.assign(["a", "b"], [0, 0], now=1.0)  # exactly capacity is fine


# --- TTL ---------------------------------------------------------------------------------------


def test_evict_idle_evicts_only_keys_idle_longer_than_ttl() -> None:
    store = _store(capacity=8, ttl_s=10.0)
    store.assign(["a"], [0], now=0.0)
    store.assign(["b"], [0], now=5.0)
    store.assign(["c"], [0], now=8.0)
    store.assign(["a"], [0], now=9.0)  # seen again: no longer idle
    assert store.evict_idle(now=12.0) == 0
    assert store.evict_idle(now=16.0) == 1  # only "b" (idle 11 s)
    assert "b" not in store and "a" in store and "c" in store
    assert store.evict_idle(now=19.5) == 2
    assert len(store) == 0


def test_evict_idle_is_a_no_op_without_ttl() -> None:
    store = _store(ttl_s=None)
    store.assign(["a", "b"], [0, 0], now=0.0)
    assert store.evict_idle(now=1e12) == 0
    assert len(store) == 2


def test_evicted_idle_slots_are_reused() -> None:
    store = _store(capacity=2, ttl_s=1.0)
    slots, _, _ = store.assign(["a", "b"], [0, 0], now=0.0)
    assert store.evict_idle(now=5.0) == 2
    new, is_new, evicted = store.assign(["c", "d"], [0, 0], now=5.0)
    assert evicted == 0 and is_new.all()
    assert sorted(new.tolist()) == sorted(slots.tolist())


# --- partitions --------------------------------------------------------------------------------


def test_release_partitions_frees_exactly_that_partitions_keys() -> None:
    store = _store(capacity=6)
    keys = ["a0", "b1", "c2", "d1", "e0", "f1"]
    slots, _, _ = store.assign(keys, [0, 1, 2, 1, 0, 1], now=1.0)
    freed = {int(s) for k, s in zip(keys, slots, strict=True) if k.endswith("1")}
    assert store.release_partitions([1]) == 3
    assert sorted(k for k in keys if k in store) == ["a0", "c2", "e0"]
    new, is_new, evicted = store.assign(["x", "y", "z"], [3, 3, 3], now=2.0)
    assert evicted == 0 and is_new.all()
    assert set(new.tolist()) == freed  # the store was full: only freed slots can be handed out
    assert store.slot("a0") == slots[0] and store.slot("c2") == slots[2]


def test_release_partitions_follows_a_keys_latest_partition() -> None:
    store = _store()
    store.assign(["a", "b"], [0, 0], now=1.0)
    store.assign(["a"], [1], now=2.0)
    assert store.release_partitions([0]) == 1
    assert "a" in store and "b" not in store


@pytest.mark.parametrize("partitions", [[], [7], set()])
def test_release_partitions_of_nothing(partitions: list[int] | set[int]) -> None:
    store = _store()
    store.assign(["a"], [0], now=1.0)
    assert store.release_partitions(partitions) == 0
    assert "a" in store


def test_release_partitions_on_empty_store() -> None:
    assert _store().release_partitions([0, 1]) == 0


def test_release_forgets_keys_and_ignores_unknown_ones() -> None:
    store = _store()
    store.assign(["a", "b"], [0, 0], now=1.0)
    assert store.release(["a", "nope"]) == 1
    assert "a" not in store and store.partition_of("a") is None and len(store) == 1


# --- reset -------------------------------------------------------------------------------------


def test_reset_zeroes_only_the_given_slots() -> None:
    store = _store(capacity=3)
    store.h.fill_(1.0)
    store.c.fill_(2.0)
    store.has_prev.fill_(True)
    store.win_next.fill_(3)
    store.win_len.fill_(4)
    store.reset(torch.tensor([0, 2]))
    for slot, zeroed in [(0, True), (1, False), (2, True)]:
        assert bool((store.h[:, slot] == 0).all()) == zeroed
        assert bool((store.c[:, slot] == 0).all()) == zeroed
        assert bool(store.has_prev[slot]) != zeroed
        assert (int(store.win_next[slot]) == 0) == zeroed
        assert (int(store.win_len[slot]) == 0) == zeroed
    assert store.h[:, 1].eq(1.0).all() and store.c[:, 1].eq(2.0).all()


def test_reset_all_zeroes_hidden_state_but_keeps_feature_memory() -> None:
    store = _store(capacity=2)
    store.h.fill_(1.0)
    store.c.fill_(1.0)
    store.has_prev.fill_(True)
    store.win_len.fill_(2)
    store.reset_all()
    assert not store.h.any() and not store.c.any()
    assert store.has_prev.all() and store.win_len.eq(2).all()


# --- sizes -------------------------------------------------------------------------------------


def test_bytes_per_key_by_hand() -> None:
    store = StateStore(layers=2, hidden=64, raw_width=8, n_features=8, capacity=10, window=32,
                       stat_width=8)
    h_and_c = 2 * 2 * 64 * 4
    prev_raw, prev_ts, has_prev = 8 * 8, 8, 1
    stats, count = 8 * 3 * 8, 8  # per value: EW mean, variance, mean square change (float64)
    window, win_next, win_len = 32 * 8 * 4, 8, 8
    assert store.bytes_per_key == h_and_c + prev_raw + prev_ts + has_prev + stats + count \
        + window + win_next + win_len == 2337


def test_tensor_shapes() -> None:
    store = StateStore(layers=3, hidden=5, raw_width=4, n_features=2, capacity=7, window=6)
    assert store.h.shape == store.c.shape == (3, 7, 5)
    assert store.prev_raw.shape == (7, 4) and store.prev_raw.dtype == torch.float64
    assert store.prev_ts.shape == (7,) and store.has_prev.dtype == torch.bool
    assert store.win.shape == (7, 6, 2)


# --- window ring buffer (driven through the engine: generic features == raw values) ------------


def _engine(window: int, capacity: int = 16) -> Engine:
    spec = default_spec("generic", n_features=3)
    model = make_model(spec=spec, hidden=4, layers=1)
    store = StateStore(1, 4, spec.raw_width, spec.n_features, capacity, window=window)
    return Engine(model, store)


def _events(start: int, n: int) -> np.ndarray:
    """Rows [i, 10 i, -i]: exact in float32, so the window can be compared exactly."""
    i = np.arange(start, start + n, dtype=np.float64)
    return np.stack([i, 10 * i, -i], axis=1)


def _window_of(engine: Engine, key: str) -> tuple[torch.Tensor, int]:
    slot = engine.store.slot(key)
    assert slot is not None
    x, lengths = engine.store.window_sequences(torch.tensor([slot]))
    return x[0], int(lengths[0])


@pytest.mark.parametrize("batch_sizes", [[3, 1, 5, 1], [1] * 10, [10], [4, 4, 2], [2, 7, 1]])
def test_window_holds_the_last_w_features_oldest_first_after_wrapping(
    batch_sizes: list[int],
) -> None:
    w = 4
    engine = _engine(window=w)
    seen = 0
    for n in batch_sizes:
        raw = _events(seen, n)
        engine.process(["a"] * n, [0] * n, raw, np.arange(seen, seen + n, dtype=np.float64), 0.0)
        seen += n
        x, length = _window_of(engine, "a")
        assert length == min(seen, w)
        expected = _events(max(0, seen - w), length)
        assert_close(x[:length], torch.as_tensor(expected, dtype=torch.float32), rtol=0, atol=0)
    assert x.shape == (w, 3)


def test_window_of_interleaved_keys_in_one_batch() -> None:
    engine = _engine(window=3)
    keys = ["a", "b", "a", "a", "c", "a", "b"]
    raw = _events(0, len(keys))
    engine.process(keys, [0] * len(keys), raw, np.arange(len(keys), dtype=np.float64), 0.0)
    for key in "abc":
        idx = [i for i, k in enumerate(keys) if k == key][-3:]
        x, length = _window_of(engine, key)
        assert length == len(idx)
        assert_close(x[:length], torch.as_tensor(raw[idx], dtype=torch.float32), rtol=0, atol=0)


def test_window_sequences_of_several_slots_at_once() -> None:
    engine = _engine(window=4)
    engine.process(["a"] * 6 + ["b"] * 2, [0] * 8, _events(0, 8), np.arange(8.0), 0.0)
    slots = torch.tensor([engine.store.slot("b"), engine.store.slot("a")])
    x, lengths = engine.store.window_sequences(slots)
    assert x.shape == (2, 4, 3) and lengths.tolist() == [2, 4]
    assert_close(x[0, :2], torch.as_tensor(_events(6, 2), dtype=torch.float32))
    assert_close(x[1], torch.as_tensor(_events(2, 4), dtype=torch.float32))


def test_a_released_key_comes_back_with_an_empty_window() -> None:
    engine = _engine(window=4)
    engine.process(["a"] * 5, [2] * 5, _events(0, 5), np.arange(5.0), 0.0)
    assert engine.store.release_partitions([2]) == 1
    engine.process(["a"], [2], _events(100, 1), np.array([100.0]), 0.0)
    x, length = _window_of(engine, "a")
    assert length == 1
    assert_close(x[0], torch.as_tensor(_events(100, 1)[0], dtype=torch.float32))

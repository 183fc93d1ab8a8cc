from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from streamer.engine import Engine
from streamer.features import default_spec
from streamer.state import ROW_TENSORS, StateStore

from ..reference import reference_predictions
from .conftest import TEST_DEVICE
from .conftest import make_model as _make_model


def make_model(**kw):  # every model of this module lives on the test device
    return _make_model(device=TEST_DEVICE, **kw)


def _store(model, capacity: int = 256, window: int = 8) -> StateStore:
    return StateStore.for_model(model, capacity, window=window, device=TEST_DEVICE)


def _random_stream(rng: np.random.Generator, n: int, n_keys: int, kind: str):
    keys = [f"k{int(i)}" for i in rng.zipf(1.5, size=n) % n_keys]  # skewed: hot keys repeat
    ts = 1.7e9 + np.cumsum(rng.exponential(0.01, size=n))
    if kind == "tick":
        price = 100 * np.exp(np.cumsum(rng.normal(0, 1e-3, size=n)))
        size = rng.integers(1, 500, size=n).astype(float)
        bid = np.where(rng.random(n) < 0.5, price - 0.01, np.nan)
        raw = np.stack([price, size, bid, bid + 0.02], axis=1)
    else:
        raw = rng.normal(size=(n, 4))
    return keys, raw, ts


@pytest.mark.parametrize("kind", ["generic", "tick"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_engine_equals_per_event_reference(kind: str, seed: int) -> None:
    """Random interleavings of many keys, repeats inside one batch, random batch cuts."""
    rng = np.random.default_rng(seed)
    spec = default_spec(kind, n_features=4)
    model = make_model(spec=spec, seed=seed)
    keys, raw, ts = _random_stream(rng, 1500, 60, kind)
    engine = Engine(model, _store(model))
    cuts = np.sort(rng.choice(np.arange(1, len(keys)), size=25, replace=False))
    got = []
    for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(keys)], strict=True):
        preds, evicted = engine.process(keys[lo:hi], [0] * (hi - lo), raw[lo:hi], ts[lo:hi], 0.0)
        assert evicted == 0
        got.append(preds)
    expected = reference_predictions(model, keys, raw, ts)
    assert_close(np.concatenate(got), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("target_kind", ["level", "change", "log_return"])
def test_engine_equals_reference_for_every_target_kind(target_kind: str) -> None:
    """Per-key normalization, change, time and calendar features, every target kind: streamed
    in random batches (with events of a key arriving out of event-time order, which both paths
    take in arrival order with the time delta clamped) equals the per-key full sequence."""
    rng = np.random.default_rng(11)
    spec = default_spec("generic", n_features=4, target="v2", extras=("diff", "dt", "hour", "dow"),
                        half_life=6.0, target_kind=target_kind)  # type: ignore[arg-type]
    spec = spec.with_stats(list(rng.normal(size=spec.n_inputs)),
                           list(rng.uniform(0.5, 2, spec.n_inputs)), (0.1, 1.5))
    model = make_model(spec=spec, seed=3)
    keys, raw, ts = _random_stream(rng, 1200, 30, "generic")
    raw = 50.0 + np.cumsum(raw, axis=0) * 0.1  # positive levels (log_return needs them)
    ts = 1.7e9 + np.cumsum(rng.exponential(600.0, size=len(ts)))  # hours and days go by
    late = rng.random(len(ts)) < 0.05
    ts[late] -= 3600.0  # late events
    engine = Engine(model, _store(model))
    cuts = np.sort(rng.choice(np.arange(1, len(keys)), size=40, replace=False))
    got = []
    for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(keys)], strict=True):
        got.append(engine.process(keys[lo:hi], [0] * (hi - lo), raw[lo:hi], ts[lo:hi], 0.0)[0])
    expected = reference_predictions(model, keys, raw, ts)
    assert_close(np.concatenate(got), expected, atol=1e-5, rtol=1e-5)
    assert np.isfinite(expected).all()


@pytest.mark.parametrize("n_keys", [40, 600])  # below and above model.CELL_ROWS
@pytest.mark.parametrize("target_kind", ["level", "log_return"])
def test_batches_of_distinct_keys_equal_the_reference(n_keys: int, target_kind: str) -> None:
    """Batches holding each key once (light traffic: the engine's dense path, through the
    per-layer cells up to CELL_ROWS rows and the fused kernel above) equal the per-key full
    sequence, with per-key normalization, every extra feature and a key's first events."""
    rng = np.random.default_rng(n_keys)
    spec = default_spec("generic", n_features=4, target="v1", extras=("diff", "dt", "hour"),
                        half_life=4.0, target_kind=target_kind)  # type: ignore[arg-type]
    model = make_model(spec=spec, seed=5)
    rounds = 6
    keys = [f"k{int(i)}" for _ in range(rounds) for i in rng.permutation(n_keys)]
    raw = 50.0 + np.cumsum(rng.normal(size=(len(keys), 4)), axis=0) * 0.1
    ts = 1.7e9 + np.cumsum(rng.exponential(30.0, size=len(keys)))
    engine = Engine(model, _store(model, capacity=1024))
    got = []
    for lo in range(0, len(keys), n_keys):  # each batch: every key once
        hi = lo + n_keys
        got.append(engine.process(keys[lo:hi], [0] * n_keys, raw[lo:hi], ts[lo:hi], 0.0)[0])
    expected = reference_predictions(model, keys, raw, ts)
    assert_close(np.concatenate(got), expected, atol=1e-5, rtol=1e-5)
    assert np.isfinite(expected).all()


def test_whole_stream_in_one_batch_equals_one_event_batches() -> None:
    rng = np.random.default_rng(5)
    model = make_model()
    keys, raw, ts = _random_stream(rng, 300, 7, "generic")
    one = Engine(model, _store(model)).process(keys, [0] * 300, raw, ts, 0.0)[0]
    single = Engine(model, _store(model))
    each = np.concatenate(
        [single.process(keys[i : i + 1], [0], raw[i : i + 1], ts[i : i + 1], 0.0)[0]
         for i in range(300)]
    )
    assert_close(one, each, atol=1e-5, rtol=1e-5)


def test_evicted_key_starts_again_from_zeros() -> None:
    model = make_model()
    engine = Engine(model, _store(model, capacity=2))
    raw = np.ones((1, 4))
    first = engine.process(["a"], [0], raw, np.array([1.0]), 1.0)[0]
    engine.process(["a"], [0], raw, np.array([2.0]), 2.0)
    _, evicted = engine.process(["b", "c"], [0, 0], np.ones((2, 4)), np.array([3.0, 3.0]), 3.0)
    assert evicted == 1 and "a" not in engine.store
    again, _ = engine.process(["a"], [0], raw, np.array([4.0]), 4.0)
    assert_close(again, first)


def test_classification_outputs_probabilities() -> None:
    model = make_model(task="classification")
    engine = Engine(model, _store(model))
    preds, _ = engine.process(["a", "a", "b"], [0, 0, 1], np.random.randn(3, 4),
                              np.arange(3.0), 0.0)
    assert preds.shape == (3, 3)
    assert_close(preds.sum(1), np.ones(3, dtype=np.float32))


@pytest.mark.parametrize("dense", [False, True])  # a repeats in the batch / every key once
def test_a_prediction_that_overflows_float32_keeps_the_keys_state(dense: bool) -> None:
    """The step is finite but the prediction in the target's units is not: the level target
    comes back as loc + scale * out in float64, here beyond float32's range (a key's value at
    3.4e38 after a 0). The key is treated as a non-finite step: NaN prediction (the service
    dead-letters it) and every state tensor as it was, so its later events go on as if the
    batch had not happened, equal to the reference without it."""
    spec = default_spec("generic", n_features=2, half_life=4.0)
    model = _make_model(spec=spec, seed=3, device=TEST_DEVICE)
    with torch.no_grad():  # head output 5 for every key: scale * 5 overflows float32 for a
        model.head.weight.zero_()
        model.head.bias.fill_(5.0)
    engine = Engine(model, _store(model))
    store = engine.store
    good = np.array([[0.0, 1.0]])
    engine.process(["a", "b"], [0, 0], np.vstack([good, good]), np.array([1.0, 1.0]), 0.0)
    slot_a = int(store.assign(["a"], np.array([0]), 0.0)[0][0])
    before = {n: getattr(store, n)[slot_a].clone() for n in ROW_TENSORS}
    h_a, c_a = store.h[:, slot_a].clone(), store.c[:, slot_a].clone()
    huge = np.array([[3.4e38, 1.0]])
    if dense:
        keys, raw, ts = ["a", "b"], np.vstack([huge, good]), np.array([2.0, 2.0])
    else:
        keys, raw, ts = ["a", "b", "a"], np.vstack([huge, good, good]), np.array([2.0, 2.0, 3.0])
    preds, _ = engine.process(keys, [0] * len(keys), raw, ts, 0.0)
    a_at = [i for i, k in enumerate(keys) if k == "a"]
    assert np.isnan(preds[a_at]).all() and np.isfinite(preds[keys.index("b")]).all()
    assert_close(store.h[:, slot_a], h_a)
    assert_close(store.c[:, slot_a], c_a)
    for name, value in before.items():
        assert torch.equal(getattr(store, name)[slot_a], value), name
    nxt, _ = engine.process(["a"], [0], good, np.array([5.0]), 0.0)
    ref = reference_predictions(model, ["a", "a"], np.vstack([good, good]), np.array([1.0, 5.0]))
    np.testing.assert_allclose(nxt[0], ref[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch", [37, 1])  # keys repeat in a batch / the dense path
@pytest.mark.parametrize("window", [4, 32])
def test_rewarm_equals_fresh_replay_of_buffered_window(window: int, batch: int) -> None:
    rng = np.random.default_rng(3)
    model = make_model(seed=1)
    keys, raw, ts = _random_stream(rng, 400, 20, "generic")
    engine = Engine(model, _store(model, window=window))
    for lo in range(0, 400, batch):
        engine.process(keys[lo:lo + batch], [0] * len(keys[lo:lo + batch]), raw[lo:lo + batch],
                       ts[lo:lo + batch], 0.0)
    new_model = make_model(seed=2)
    rewarmed = engine.swap_model(new_model, "rewarm")
    assert rewarmed == len(set(keys))
    store = engine.store
    for key in set(keys):
        idx = [i for i, k in enumerate(keys) if k == key][-window:]
        x = torch.as_tensor(raw[idx], dtype=torch.float32, device=TEST_DEVICE).unsqueeze(0)
        with torch.no_grad():
            _, (h, c) = new_model(x)
        slot = store.slot(key)
        assert_close(store.h[:, slot], h[:, 0], atol=1e-5, rtol=1e-5)
        assert_close(store.c[:, slot], c[:, 0], atol=1e-5, rtol=1e-5)


def test_swap_reset_and_keep_policies() -> None:
    model = make_model()
    engine = Engine(model, _store(model))
    engine.process(["a", "b"], [0, 0], np.ones((2, 4)), np.array([1.0, 1.0]), 0.0)
    before = engine.store.h.clone()
    engine.swap_model(make_model(seed=9), "keep")
    assert torch.equal(engine.store.h, before)
    engine.swap_model(make_model(seed=9), "reset")
    assert not engine.store.h.any()
    with pytest.raises(ValueError, match="state shape"):
        engine.swap_model(make_model(hidden=8), "keep")


@pytest.mark.parametrize("dense", [False, True])  # a repeats in the batch / every key once
def test_a_key_whose_step_overflows_keeps_its_state_while_others_advance(dense: bool) -> None:
    """State guard: in one batch, key a's overflowing event leaves a's state (h, c, previous
    event, re-warm window) as it was and its predictions NaN; key b advances as usual. Both
    layouts: a with several events (padded rows) and each key once (the dense path)."""
    # Without per-key normalization: with it, a key's own scale absorbs even 3e38 inputs.
    spec = default_spec("generic", n_features=4).with_stats([0.0] * 4, [1e-3] * 4)
    model = _make_model(spec=spec, seed=7, device=TEST_DEVICE)
    engine = Engine(model, _store(model))
    store = engine.store
    good = np.array([[0.5, -1.0, 2.0, 0.25]])
    engine.process(["a", "b"], [0, 0], np.vstack([good, good]), np.array([1.0, 1.0]), 0.0)
    slot_a = int(store.assign(["a"], np.array([0]), 0.0)[0][0])
    guarded = ("prev_raw", "prev_ts", "has_prev", "stats", "count", "win", "win_len",
               "win_next")
    before = {n: getattr(store, n)[slot_a].clone() for n in guarded}
    h_a, c_a = store.h[:, slot_a].clone(), store.c[:, slot_a].clone()
    bad = np.array([[3e38, -3e38, 3e38, -3e38]])
    if dense:
        keys, raw, ts = ["a", "b"], np.vstack([bad, good]), np.array([2.0, 2.0])
    else:
        keys, raw, ts = ["a", "a", "b", "a"], np.vstack([good, bad, good, good]), np.array(
            [2.0, 3.0, 2.0, 4.0])
    preds, _ = engine.process(keys, [0] * len(keys), raw, ts, 0.0)
    b_at = keys.index("b")
    a_at = [i for i, k in enumerate(keys) if k == "a"]
    assert np.isnan(preds[a_at]).all() and np.isfinite(preds[b_at]).all()
    assert_close(store.h[:, slot_a], h_a)
    assert_close(store.c[:, slot_a], c_a)
    for name, value in before.items():
        assert torch.equal(getattr(store, name)[slot_a], value), name
    # b matches the reference that saw only b's events.
    expected = reference_predictions(model, ["b", "b"], np.vstack([good, good]),
                                     np.array([1.0, 2.0]))
    np.testing.assert_allclose(preds[b_at], expected[1], rtol=1e-5, atol=1e-6)
    # a goes on from its last good state, as if the batch had not happened.
    nxt, _ = engine.process(["a"], [0], good, np.array([5.0]), 0.0)
    ref = reference_predictions(model, ["a", "a"], np.vstack([good, good]), np.array([1.0, 5.0]))
    np.testing.assert_allclose(nxt[0], ref[1], rtol=1e-5, atol=1e-6)

"""The bucketed step (streamer/graphs.py) equals the packed eager step and the per-event
reference, its padding never touches a key's state, and graphs follow a hot swap.

On the CPU the bucketed function runs eagerly, padding included; with
``STREAMER_TEST_DEVICE=cuda`` (scripts/check_cuda.sh) the same tests replay captured CUDA
graphs, and the CUDA-marked tests check every bucket's replay against the eager step."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry
from torch.testing import assert_close

from streamer.artifact import save_artifact
from streamer.engine import Engine
from streamer.features import default_spec
from streamer.graphs import GraphStep, bucket_sizes, wave_step
from streamer.service import Service
from streamer.settings import StreamerSettings, add_settings_arguments, settings_from_args
from streamer.state import StateStore

from ..reference import reference_predictions
from .conftest import TEST_DEVICE
from .conftest import make_model as _make_model

STATE = ("h", "c", "prev_raw", "prev_ts", "has_prev", "stats", "count", "win", "win_next",
         "win_len")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def make_model(device: torch.device | str = TEST_DEVICE, **kw):
    return _make_model(device=device, **kw)


def _engines(model, capacity: int = 128, window: int = 4, max_batch: int = 64,
             device: torch.device | str = TEST_DEVICE) -> tuple[Engine, Engine]:
    eager = Engine(model, StateStore.for_model(model, capacity, window=window, device=device))
    bucketed = Engine(model, StateStore.for_model(model, capacity, window=window, device=device))
    bucketed.bucketed = GraphStep(max_batch, max_waves=10_000)  # every batch by waves
    return eager, bucketed


def _rows(store: StateStore, name: str) -> torch.Tensor:
    """A state tensor's key rows (the scratch slot past capacity left out)."""
    t = getattr(store, name)
    return t[:, : store.capacity] if name in ("h", "c") else t[: store.capacity]


def _stream(rng: np.random.Generator, n: int, n_keys: int, kind: str = "generic"):
    keys = [f"k{int(i)}" for i in rng.zipf(1.5, size=n) % n_keys]  # hot keys repeat in a batch
    ts = 1.7e9 + np.cumsum(rng.exponential(30.0, size=n))
    if kind == "tick":
        price = 100 * np.exp(np.cumsum(rng.normal(0, 1e-3, size=n)))
        size = rng.integers(1, 500, size=n).astype(float)
        bid = np.where(rng.random(n) < 0.5, price - 0.01, np.nan)
        return keys, np.stack([price, size, bid, bid + 0.02], axis=1), ts
    return keys, rng.normal(size=(n, 4)) + 3.0, ts


def test_bucket_sizes_and_edges() -> None:
    assert bucket_sizes(8192) == [8 * 2**i for i in range(11)]
    assert bucket_sizes(100) == [8, 16, 32, 64, 128]
    step = GraphStep(64)
    assert [step.bucket_of(m) for m in (1, 7, 8, 9, 16, 17, 63, 64, 65, 500)] == \
        [8, 8, 8, 16, 16, 32, 64, 64, 64, 64]


SPECS = {
    "generic": default_spec("generic", 4),
    "tick": default_spec("tick"),
    "normalized_change": default_spec("generic", 4, extras=("diff", "dt", "hour", "dow"),
                                      half_life=16.0, target_kind="change"),
    "normalized_log_return": default_spec("generic", 4, extras=("diff",), half_life=8.0,
                                          target_kind="log_return"),
}


@pytest.mark.parametrize("batch", [1, 7, 8, 9, 17, 64, 100])
@pytest.mark.parametrize("name", list(SPECS))
def test_bucketed_step_equals_eager_step_and_reference(name: str, batch: int) -> None:
    """Batches at and around every bucket edge (and past the largest bucket, in chunks),
    hot keys repeating inside a batch: predictions equal the eager step's and the per-event
    reference's (1e-5), and so does every key's state afterwards."""
    rng = np.random.default_rng(batch)
    spec = SPECS[name]
    model = make_model(spec=spec, seed=batch)
    eager, bucketed = _engines(model, max_batch=64)
    n_keys = 40 if batch < 64 else 120
    keys, raw, ts = _stream(rng, 6 * batch + 3, n_keys, spec.kind)
    got, want = [], []
    for lo in range(0, len(keys), batch):
        hi = min(len(keys), lo + batch)
        got.append(bucketed.process(keys[lo:hi], [0] * (hi - lo), raw[lo:hi], ts[lo:hi], 0.0)[0])
        want.append(eager.process(keys[lo:hi], [0] * (hi - lo), raw[lo:hi], ts[lo:hi], 0.0)[0])
    step = bucketed.bucketed
    assert step is not None and step.batches == len(got)  # all served by waves
    assert set(step.buckets) <= set(bucket_sizes(64))
    assert_close(np.concatenate(got), np.concatenate(want), atol=1e-5, rtol=1e-5)
    assert_close(np.concatenate(got), reference_predictions(model, keys, raw, ts),
                 atol=1e-5, rtol=1e-5)
    for state in STATE:
        assert_close(_rows(bucketed.store, state), _rows(eager.store, state), atol=1e-5,
                     rtol=1e-5, equal_nan=True, msg=state)


def test_a_wave_larger_than_the_largest_bucket_runs_in_chunks() -> None:
    """150 distinct keys, some twice, with buckets up to 64: wave 0 runs as 64 + 64 + 22 rows,
    wave 1 as 30; equal to the eager step and the reference."""
    model = make_model(seed=12)
    eager, bucketed = _engines(model, capacity=200, max_batch=64)
    rng = np.random.default_rng(12)
    keys = [f"k{i}" for i in range(150)] + [f"k{i}" for i in rng.choice(150, 30, replace=False)]
    raw, ts = rng.normal(size=(180, 4)), np.arange(180.0)
    got = bucketed.process(keys, [0] * 180, raw, ts, 0.0)[0]
    assert bucketed.bucketed is not None and bucketed.bucketed.batches == 1
    assert set(bucketed.bucketed.buckets) == {32, 64}
    assert_close(got, eager.process(keys, [0] * 180, raw, ts, 0.0)[0], atol=1e-5, rtol=1e-5)
    assert_close(got, reference_predictions(model, keys, raw, ts), atol=1e-5, rtol=1e-5)
    for s in STATE:
        assert_close(_rows(bucketed.store, s), _rows(eager.store, s), atol=1e-5, rtol=1e-5)


def test_classification_bucketed_equals_eager() -> None:
    model = make_model(task="classification", seed=3)
    eager, bucketed = _engines(model)
    keys, raw, ts = _stream(np.random.default_rng(3), 90, 20)
    for lo in range(0, 90, 30):
        a = bucketed.process(keys[lo:lo + 30], [0] * 30, raw[lo:lo + 30], ts[lo:lo + 30], 0.0)[0]
        b = eager.process(keys[lo:lo + 30], [0] * 30, raw[lo:lo + 30], ts[lo:lo + 30], 0.0)[0]
        assert_close(a, b, atol=1e-5, rtol=1e-5)
        assert_close(a.sum(1), np.ones(30, dtype=np.float32), atol=1e-5, rtol=0)


def test_padding_rows_touch_only_the_scratch_slot() -> None:
    """A wave of 9 keys runs in the 16-row bucket; 7 padding rows point at the scratch slot
    past capacity. Every key outside the batch keeps its state bit for bit, and a bucket made
    of padding alone changes no key row at all."""
    model = make_model(seed=4)
    _, engine = _engines(model, capacity=40)
    store, rng = engine.store, np.random.default_rng(4)
    warm = [f"k{i}" for i in range(40)]  # the store is full: every slot belongs to a key
    engine.process(warm, [0] * 40, rng.normal(size=(40, 4)), np.full(40, 1.0), 0.0)
    assert store.scratch_slot() == store.capacity == 40 and len(store) == 40
    assert all(0 <= store.slot(k) < store.capacity for k in warm)  # type: ignore[operator]
    batch = warm[:9]
    others = [store.slot(k) for k in warm[9:]]
    before = {s: _rows(store, s).clone() for s in STATE}
    engine.process(batch, [0] * 9, rng.normal(size=(9, 4)), np.full(9, 2.0), 0.0)
    assert 16 in engine.bucketed.buckets  # type: ignore[union-attr]
    for s in STATE:
        after, old = _rows(store, s), before[s]
        if s in ("h", "c"):
            after, old = after[:, others], old[:, others]
        else:
            after, old = after[others], old[others]
        assert torch.equal(after, old), s
    # A bucket of nothing but padding: no key row moves.
    before = {s: _rows(store, s).clone() for s in STATE}
    slot = torch.full((16,), store.scratch_slot(), dtype=torch.int64, device=store.device)
    raw = torch.randn(16, 4, dtype=torch.float64, device=store.device)
    with torch.inference_mode():
        wave_step(model, model.spec, store, slot, raw, torch.full_like(raw[:, 0], 3.0))
    for s in STATE:
        assert torch.equal(_rows(store, s), before[s]), s


@pytest.mark.parametrize("cause", ["step", "prediction"])
@pytest.mark.parametrize("repeat_bad_key", [True, False])
def test_state_guard_matches_the_eager_step(repeat_bad_key: bool, cause: str) -> None:
    """A key whose step overflows, or whose prediction overflows float32 on the way to the
    target's units, keeps its state from before the batch and gets NaN predictions for all
    its events; other keys advance, as in the eager step (every key once in the batch: one
    wave, the guard inside the graph; the bad key three times: the restore after the waves)."""
    if cause == "step":
        spec = default_spec("generic", n_features=4).with_stats([0.0] * 4, [1e-3] * 4)
        model = make_model(spec=spec, seed=7)
        good = np.array([[0.5, -1.0, 2.0, 0.25]])
        bad = np.array([[3e38, -3e38, 3e38, -3e38]])
    else:  # level target, per-key scale ~1e38 after a 0 then 3.4e38: loc + scale * 5 overflows
        model = make_model(spec=default_spec("generic", n_features=4, half_life=4.0), seed=7)
        with torch.no_grad():
            model.head.weight.zero_()
            model.head.bias.fill_(5.0)
        good = np.array([[0.0, 1.0, 1.0, 1.0]])
        bad = np.array([[3.4e38, 1.0, 1.0, 1.0]])
    eager, bucketed = _engines(model)
    for engine in (eager, bucketed):
        engine.process(["a", "b"], [0, 0], np.vstack([good, good]), np.array([1.0, 1.0]), 0.0)
    keys = ["a", "a", "b", "a"] if repeat_bad_key else ["b", "a"]  # 3 waves, or just one
    raw = np.vstack([good, bad, good, good]) if repeat_bad_key else np.vstack([good, bad])
    ts = np.arange(2.0, 2.0 + len(keys))
    slot_a = bucketed.store.slot("a")
    before = {s: _rows(bucketed.store, s).clone() for s in STATE}
    got, _ = bucketed.process(keys, [0] * len(keys), raw, ts, 0.0)
    want, _ = eager.process(keys, [0] * len(keys), raw, ts, 0.0)
    is_a = np.array([k == "a" for k in keys])
    assert np.isnan(got[is_a]).all() and np.isfinite(got[~is_a]).all()
    assert_close(got, want, atol=1e-5, rtol=1e-5, equal_nan=True)
    for s in STATE:
        row = (lambda t: t[:, slot_a]) if s in ("h", "c") else (lambda t: t[slot_a])
        assert torch.equal(row(_rows(bucketed.store, s)), row(before[s])), s
        assert_close(_rows(bucketed.store, s), _rows(eager.store, s), atol=1e-5, rtol=1e-5)
    nxt = bucketed.process(["a"], [0], good, np.array([9.0]), 0.0)[0]
    assert_close(nxt, eager.process(["a"], [0], good, np.array([9.0]), 0.0)[0])


def test_a_batch_with_too_many_waves_goes_to_the_eager_step() -> None:
    """One key 40 times in a batch (more than max_waves=32): the eager step serves it, still
    equal to the reference."""
    model = make_model(seed=5)
    _, engine = _engines(model)
    engine.bucketed = GraphStep(64)  # max_waves=32
    keys = ["hot"] * 40 + ["cold"]
    raw = np.random.default_rng(5).normal(size=(41, 4))
    ts = np.arange(41.0)
    got, _ = engine.process(keys, [0] * 41, raw, ts, 0.0)
    assert engine.bucketed.batches == 0 and not engine.bucketed.buckets  # never used
    engine.process(keys[-3:], [0] * 3, raw[-3:], ts[-3:], 0.0)
    assert engine.bucketed.batches == 1
    assert_close(got, reference_predictions(model, keys, raw, ts), atol=1e-5, rtol=1e-5)


def test_graphs_follow_a_hot_swap_and_a_reshaped_store() -> None:
    """After swap_model (same shape, then more layers and a wider state) the buckets are built
    anew against the new weights and state tensors, and results still equal the eager step."""
    rng = np.random.default_rng(6)
    model = make_model(seed=6)
    eager, bucketed = _engines(model)
    step = bucketed.bucketed
    assert step is not None
    keys, raw, ts = _stream(rng, 300, 30)

    def feed(lo: int, hi: int) -> None:
        a = bucketed.process(keys[lo:hi], [0] * (hi - lo), raw[lo:hi], ts[lo:hi], 0.0)[0]
        b = eager.process(keys[lo:hi], [0] * (hi - lo), raw[lo:hi], ts[lo:hi], 0.0)[0]
        assert_close(a, b, atol=1e-5, rtol=1e-5)

    feed(0, 50)
    first = dict(step.buckets)
    feed(50, 100)  # no swap: the buckets (graphs on CUDA) of the first batch are reused
    assert first and step.batches == 2 and all(step.buckets[s] is first[s] for s in first)
    first = dict(step.buckets)
    for new, lo in ((make_model(seed=8), 100), (make_model(seed=9, hidden=24, layers=3), 200)):
        for engine in (eager, bucketed):
            engine.swap_model(new, "rewarm")
        feed(lo, lo + 100)
        assert step.buckets and all(step.buckets[s] is not first.get(s) for s in step.buckets)
        first = dict(step.buckets)
    assert bucketed.store.h.shape == (3, 129, 24)  # the scratch slot survives the reshape
    # The grown and the reshaped tensors are normal tensors: a changelog restore writes them
    # outside inference mode (an inference tensor would refuse the in-place write).
    slots = torch.tensor([0, 1], device=bucketed.store.device)
    for s in STATE:
        t = getattr(bucketed.store, s)
        assert not t.is_inference(), s
        if s in ("h", "c"):
            t[:, slots] = 0
        else:
            t[slots] = 0


def test_a_failed_capture_falls_back_to_the_eager_step(caplog: pytest.LogCaptureFixture) -> None:
    """Capture asked for where it cannot work (CUDA graphs on a CPU store): the warning is
    logged once, graphs are off, and every batch is served by the eager step, correctly."""
    if TEST_DEVICE.type == "cuda":
        pytest.skip("capture works on CUDA")
    model = make_model(seed=2)
    eager, engine = _engines(model)
    engine.bucketed = GraphStep(64, capture=True)
    keys, raw, ts = _stream(np.random.default_rng(2), 60, 10)
    with caplog.at_level(logging.WARNING, logger="streamer.graphs"):
        assert not engine.bucketed.warm(engine)
        for lo in (0, 30):
            a = engine.process(keys[lo:lo + 30], [0] * 30, raw[lo:lo + 30], ts[lo:lo + 30], 0.0)
            b = eager.process(keys[lo:lo + 30], [0] * 30, raw[lo:lo + 30], ts[lo:lo + 30], 0.0)
            assert_close(a[0], b[0])
    assert [r.getMessage() for r in caplog.records if "capture failed" in r.getMessage()] \
        and len(caplog.records) == 1
    assert engine.bucketed.captures == 0 and not engine.bucketed.buckets


@pytest.mark.parametrize("flag", [True, False])
def test_the_cuda_graphs_setting_hooks_the_step_on_cuda_only(tmp_path: Path, flag: bool) -> None:
    """``cuda_graphs`` (flag and default) reaches the service's engine on a CUDA device and is
    ignored on the CPU."""
    save_artifact(tmp_path / "m", make_model(device="cpu", seed=1), version="v1")
    args = ["--model", str(tmp_path / "m"), "--device", TEST_DEVICE.type,
            "--metrics-address", "127.0.0.1:0"] + (["--cuda-graphs"] if flag else [])
    parser = argparse.ArgumentParser(prog="streamer")
    add_settings_arguments(parser, StreamerSettings)
    settings = settings_from_args(StreamerSettings, parser.parse_args(args))
    assert settings.cuda_graphs is flag
    service = Service.from_settings(settings, CollectorRegistry())
    step = service.engine.bucketed
    if flag and TEST_DEVICE.type == "cuda":
        assert step is not None and step.sizes[-1] == settings.max_batch_events
        assert step.captures == len(step.sizes)  # every bucket captured at start
    else:
        assert step is None


# --- CUDA only (scripts/check_cuda.sh) ------------------------------------------------------


@needs_cuda
def test_cuda_graph_replay_equals_eager_at_every_bucket() -> None:
    """Every bucket 8..512 captured once and replayed: equal to the CUDA eager step and to
    the CPU eager step (1e-5); then a hot swap (new weights, then a reshaped state) re-captures
    and stays equal."""
    cuda = torch.device("cuda")
    rng = np.random.default_rng(11)
    model = make_model(device=cuda, seed=11)
    eager, graphs = _engines(model, capacity=2048, max_batch=512, device=cuda)
    cpu = Engine(make_model(device="cpu", seed=11),
                 StateStore.for_model(model, 2048, window=4, device="cpu"))
    step = graphs.bucketed
    assert step is not None
    assert step.warm(graphs) and step.captures == len(bucket_sizes(512))
    for s in STATE:  # the warm-up runs before capture wrote only the scratch slot
        assert not _rows(graphs.store, s).any(), s

    def check(n: int) -> None:
        keys, raw, ts = _stream(rng, n, 1500)
        a = graphs.process(keys, [0] * n, raw, ts, 0.0)[0]
        assert_close(a, cpu.process(keys, [0] * n, raw, ts, 0.0)[0], atol=1e-5, rtol=1e-5)
        assert_close(a, eager.process(keys, [0] * n, raw, ts, 0.0)[0], atol=1e-5, rtol=1e-5)

    for n in (1, 8, 9, 16, 17, 32, 33, 64, 65, 128, 129, 256, 257, 512, 700):
        check(n)
    assert set(step.buckets) == set(bucket_sizes(512))
    assert all(b.graph is not None for b in step.buckets.values())
    captured = step.captures
    assert captured == len(bucket_sizes(512))  # each bucket once (at warm), then replayed
    for seed, hidden, layers in ((12, 16, 2), (13, 32, 3)):
        new = make_model(device=cuda, seed=seed, hidden=hidden, layers=layers)
        twin = make_model(device="cpu", seed=seed, hidden=hidden, layers=layers)
        for engine, m in ((eager, new), (graphs, new), (cpu, twin)):
            engine.swap_model(m, "rewarm")
        for n in (9, 300):
            check(n)
        assert step.captures > captured
        captured = step.captures
    for s in STATE:
        assert_close(_rows(graphs.store, s), _rows(eager.store, s), atol=1e-5, rtol=1e-5)

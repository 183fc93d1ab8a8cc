"""The engine step at bucketed batch sizes, captured as CUDA graphs on a GPU.

A batch is cut into *waves*: wave k holds the k-th event of every key that has more than k
events in the batch (the engine's rows are sorted longest first, so wave k is a prefix of the
rows). Keys in one wave are distinct, so a wave is one batched single step: gather each key's
state row by slot, features and per-key statistics (``streamer.features``), the stacked LSTM
cell, the head, the prediction in the target's units, and the new state scattered back. Waves
in order are the same arithmetic as stepping event by event (tests prove it against the
per-event reference and the packed eager step).

A wave of m keys runs in the smallest bucket >= m (powers of two from ``min_bucket`` up to
``max_batch``; a larger wave runs in chunks). Each bucket has a static input buffer (slot, time and
raw values per row: one copy in per wave) and a static result (prediction and ok flag: one copy
out), and the wave step is a function of those buffers alone, so on CUDA it is captured
once per bucket with ``torch.cuda.CUDAGraph`` (warm-up on a side stream first, as PyTorch's
CUDA graphs notes require) and replayed; on the CPU the same function runs eagerly, padding
included. Padding rows point at the store's scratch slot (:meth:`StateStore.scratch_slot`),
a row no key ever owns, so they never touch a key's state.

Inside a graph: no host sync and no shape that depends on data. The state guard is therefore
split: inside, a row whose step is not finite keeps its state (``torch.where``); outside, after
all waves, one host sync (``key_ok.all()``, the eager step has the same one) and, only for a
batch with such a key, the restore of its state from before the batch and NaN predictions,
exactly as ``streamer.engine`` does (a batch of more than one wave gathers that state first).
Graphs capture the addresses of the model's weights and the store's tensors; a hot swap or a
reshaped store is detected and the graphs are re-captured.

A batch whose hottest key has more than ``max_waves`` events, or a failed capture (logged
once, graphs then off), is left to the engine's packed eager step (``run`` returns None).

Usage::

    engine.bucketed = GraphStep(max_batch=2048)          # capture on CUDA, eager on the CPU
    engine.bucketed.warm(engine)                         # capture every bucket now
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from streamer.engine import (
    Engine,
    _finite_rows,
    _nan_bad_rows,
    _Plan,
    _restore_bad_rows,
    _snapshot,
    serving_units,
)
from streamer.features import FeatureSpec, compute_features, normalize_steps
from streamer.model import LSTMModel
from streamer.state import LAYER_TENSORS, ROW_TENSORS, StateStore

log = logging.getLogger(__name__)

Outputs = dict[str, torch.Tensor]


def bucket_sizes(max_batch: int, min_bucket: int = 8) -> list[int]:
    """Powers of two from ``min_bucket`` up to the first one >= ``max_batch``."""
    sizes = [min_bucket]
    while sizes[-1] < max_batch:
        sizes.append(sizes[-1] * 2)
    return sizes


def wave_step(
    model: LSTMModel, spec: FeatureSpec, store: StateStore,
    slot: torch.Tensor, raw: torch.Tensor, ts: torch.Tensor,
) -> Outputs:
    """One event for each of B distinct slots, state advanced in place (capturable: no host
    sync, every shape fixed by B). slot [B] int64 (distinct, or the scratch slot), raw [B, R]
    float64, ts [B] float64 -> ``pred`` [B, out] float32 in serving units, ``ok`` [B] bool
    (the row's features, output and state are finite; a row that is not keeps its state)."""
    h0, c0 = store.h[:, slot], store.c[:, slot]  # [L, B, H]
    prev_raw, prev_ts, has_prev = store.prev_raw[slot], store.prev_ts[slot], store.has_prev[slot]
    stats0, count0 = store.stats[slot], store.count[slot]
    win_next, win_len = store.win_next[slot], store.win_len[slot]
    feats = compute_features(spec, raw[:, None], ts[:, None], prev_raw[:, None],
                             prev_ts[:, None], has_prev[:, None], torch.float64)
    valid = torch.ones_like(has_prev)[:, None]
    x, loc, scale, stats, count = normalize_steps(
        spec, feats, raw[:, None], prev_raw[:, None], has_prev[:, None], stats0, count0, valid
    )
    x = x[:, 0]
    y, h, c = model.step(x, h0, c0)
    out = serving_units(model, raw, y, loc[:, 0], scale[:, 0])
    ok = _finite_rows((x[:, None], y[:, None], out[:, None]), h, c, valid)
    row = ok[:, None]
    store.h[:, slot] = torch.where(ok[None, :, None], h, h0)
    store.c[:, slot] = torch.where(ok[None, :, None], c, c0)
    store.prev_raw[slot] = torch.where(row, raw, prev_raw)
    store.prev_ts[slot] = torch.where(ok, ts, prev_ts)
    store.has_prev[slot] = has_prev | ok
    store.stats[slot] = torch.where(ok[:, None, None], stats, stats0)
    store.count[slot] = torch.where(ok, count, count0)
    store.win[slot, win_next] = torch.where(row, x, store.win[slot, win_next])
    store.win_next[slot] = torch.where(ok, (win_next + 1) % store.window, win_next)
    store.win_len[slot] = torch.where(ok, torch.clamp(win_len + 1, max=store.window), win_len)
    return {"pred": out, "ok": ok}


class _Bucket:
    """Static buffers of one bucket size and, on CUDA, its captured graph. ``inp`` [B, 2 + R]
    float64 holds each row's slot (exact in float64), time and raw values, so a wave costs one
    copy in; ``res`` [B, out + 1] each row's prediction and its ok flag, one copy out."""

    def __init__(self, size: int, store: StateStore) -> None:
        self.size = size
        self.inp = torch.zeros(size, 2 + store.prev_raw.shape[1], dtype=torch.float64,
                               device=store.device)
        self.inp[:, 0] = store.scratch_slot()
        self.real = 0  # rows [real:] point at the scratch slot
        self.graph: torch.cuda.CUDAGraph | None = None
        self.res = torch.empty(0)

    def step(self, engine: Engine) -> torch.Tensor:
        """The wave step on the static buffers (what a graph captures): res [B, out + 1]."""
        inp = self.inp
        out = wave_step(engine.model, engine.spec, engine.store, inp[:, 0].long(), inp[:, 2:],
                        inp[:, 1])
        return torch.cat([out["pred"], out["ok"].to(out["pred"].dtype)[:, None]], dim=1)


class GraphStep:
    """Bucketed wave step for :class:`streamer.engine.Engine` (hooked in as
    ``engine.bucketed``). ``capture``: record CUDA graphs (default: when the store is on CUDA);
    False runs the same padded function eagerly (the CPU, and the tests)."""

    def __init__(
        self, max_batch: int, capture: bool | None = None, min_bucket: int = 8,
        max_waves: int = 32,
    ) -> None:
        self.sizes = bucket_sizes(max_batch, min_bucket)
        self.capture = capture
        self.max_waves = max_waves
        self.buckets: dict[int, _Bucket] = {}
        self.captures = 0  # graphs recorded so far (re-captures after a swap included)
        self.batches = 0  # batches this step served (the rest went to the eager step)
        self._identity: list[tuple[object, int]] = []  # holds them: no address is reused
        self._failed = False

    @torch.inference_mode()
    def warm(self, engine: Engine) -> bool:
        """Build (on CUDA: capture) every bucket now, so the first batches do not pay for it
        (the service calls this at start; after a hot swap they are re-captured lazily).
        False when capture failed and the eager step serves."""
        capture = engine.store.device.type == "cuda" if self.capture is None else self.capture
        return not self._failed and self._prepare(engine, set(self.sizes), capture)

    def bucket_of(self, m: int) -> int:
        """The bucket a wave of m >= 1 rows runs in (the largest one for a chunk of a larger
        wave)."""
        for size in self.sizes:
            if size >= m:
                return size
        return self.sizes[-1]

    def run(self, engine: Engine, buf: Sequence[torch.Tensor], plan: _Plan) -> torch.Tensor | None:
        """The engine's ``_run`` by waves: predictions [N, out] in input order, or None to leave
        the batch to the eager step (too many waves, or graphs failed to capture)."""
        lengths = plan.lengths  # [U] longest row first, so wave k is a prefix of the rows
        if self._failed or plan.width > self.max_waves or np.any(lengths[1:] > lengths[:-1]):
            return None
        store, model = engine.store, engine.model
        capture = store.device.type == "cuda" if self.capture is None else self.capture
        waves = np.searchsorted(-lengths, -np.arange(plan.width), side="left")  # rows per wave
        chunk = self.sizes[-1]
        needed = {self.bucket_of(min(int(m) - lo, chunk))
                  for m in waves for lo in range(0, int(m), chunk)}
        if not self._prepare(engine, needed, capture):
            return None
        n, u, width, r = len(plan.pos), len(plan.rows), plan.width, store.prev_raw.shape[1]
        raw, ts, pos, slots, row_lengths, new, _window_pos = buf
        raw, pos, slots = raw.view(n, r), pos.long(), slots.long()
        if len(new):
            store.reset(new.long())
        saved = _snapshot(store, slots) if width > 1 else None  # a bad key's state before
        # [U, T, 2 + R]: per row and step its slot, time and raw values (padding: zeros).
        lay = raw.new_zeros(u, width, 2 + r)
        lay[:, :, 0] = slots.to(lay.dtype)[:, None]
        lay.view(u * width, 2 + r)[:, 1:].index_copy_(0, pos, torch.cat([ts[:, None], raw], 1))
        res = torch.empty(u, width, model.config.output_size + 1, device=store.device)
        scratch = store.scratch_slot()
        for k, m in enumerate(waves):
            for lo in range(0, int(m), chunk):
                hi = min(int(m), lo + chunk)
                b = self.buckets[self.bucket_of(hi - lo)]
                b.inp[: hi - lo].copy_(lay[lo:hi, k])
                if hi - lo < b.real:  # rows the last wave used, past this one's: padding again
                    b.inp[hi - lo: b.real, 0] = scratch
                b.real = hi - lo
                if b.graph is not None:
                    b.graph.replay()
                else:
                    b.res = b.step(engine)
                res[lo:hi, k] = b.res[: hi - lo]
        out = res[:, :, :-1].reshape(u * width, -1)[pos]
        valid = torch.arange(width, device=store.device)[None, :] < row_lengths.long()[:, None]
        key_ok = ((res[:, :, -1] > 0) | ~valid).all(1)  # [U]: every step of the row finite
        self.batches += 1
        if bool(key_ok.all()):  # the one host sync, outside every graph
            return out
        if saved is not None:
            _restore_bad_rows(store, slots, saved, key_ok)
        return _nan_bad_rows(out, key_ok[pos // width])

    def _prepare(self, engine: Engine, needed: set[int], capture: bool) -> bool:
        """Buckets in ``needed`` exist (and are captured when ``capture``); graphs recorded
        against another model or other store tensors are dropped first. False: capture failed."""
        engine.store.scratch_slot()  # grows the state tensors once: before their addresses
        identity = _identity(engine)
        if len(identity) != len(self._identity) or any(
            a is not b or pa != pb
            for (a, pa), (b, pb) in zip(identity, self._identity, strict=False)
        ):
            self.buckets.clear()  # weights or state moved: every graph's addresses are stale
            self._identity = identity
        for size in sorted(needed - self.buckets.keys()):
            bucket = _Bucket(size, engine.store)
            if capture:
                try:
                    _capture(bucket, engine)
                except Exception as exc:  # noqa: BLE001 - any capture error: eager from now on
                    log.warning("CUDA graph capture failed (%s: %s); the eager step serves "
                                "from now on", type(exc).__name__, exc)
                    self._failed = True
                    self.buckets.clear()
                    return False
                self.captures += 1
            self.buckets[size] = bucket
        return True


def _capture(bucket: _Bucket, engine: Engine) -> None:
    """Warm up on a side stream, then record the bucket's step into its graph (PyTorch's CUDA
    graphs notes: warm-up before capture, side stream, static inputs). The bucket's slots all
    point at the scratch slot, so the warm-up runs touch no key's state; capture runs nothing."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            bucket.step(engine)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        bucket.res = bucket.step(engine)
    bucket.graph = graph


def _identity(engine: Engine) -> list[tuple[object, int]]:
    """What a graph depends on: the model (its spec and config are baked in), the addresses
    of its weights and buffers and of every state tensor. Compared by identity and address."""
    store = engine.store
    tensors = [*engine.model.parameters(), *engine.model.buffers(),
               *(getattr(store, name) for name in (*LAYER_TENSORS, *ROW_TENSORS))]
    return [(engine.model, 0), *((t, t.data_ptr()) for t in tensors)]

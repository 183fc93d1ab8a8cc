"""The hot path: a decoded batch in, one prediction per event out, state advanced in place.

A batch may hold several events of one key (in offset order). Instead of stepping event by
event, the batch is laid out as one padded sequence per distinct key, rows sorted by length,
and the LSTM runs once over all of them (packed), starting from each key's stored state. That is
the same arithmetic as stepping each event in turn, which the tests prove against a per-event
reference. Host work is index bookkeeping in numpy; the device gets one float64 buffer in and
gives one prediction tensor back.

Features, per-key normalization (statistics in the state store next to h and c) and the step
from the model's output to the predicted next value come from ``streamer.features``, the code
the trainer runs, so a streamed prediction equals the trainer's offline one (tests prove it for
every target kind).

No Kafka, HTTP or metrics here: the service times and counts from outside.

Usage::

    engine = Engine(model, store)
    preds = engine.process(keys, partitions, raw, ts, now)   # np.ndarray [N, out]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from streamer.copies import HostStaging
from streamer.features import FeatureSpec, compute_features, normalize_steps, to_value
from streamer.model import LSTMModel
from streamer.state import ROW_TENSORS, StateStore

if TYPE_CHECKING:
    from streamer.graphs import GraphStep

SwapPolicy = Literal["rewarm", "reset", "keep"]


class Engine:
    bucketed: GraphStep | None = None  # the step by bucketed waves / CUDA graphs (graphs.py)

    def __init__(self, model: LSTMModel, store: StateStore) -> None:
        self.model = model.eval()
        self.store = store
        self.spec = model.spec
        self._staging = HostStaging(store.device)

    @torch.inference_mode()
    def process(
        self,
        keys: Sequence[str],
        partitions: Sequence[int],
        raw: np.ndarray,  # [N, R] float64
        ts: np.ndarray,  # [N] float64 epoch seconds
        now: float,
    ) -> tuple[np.ndarray, int]:
        """Predictions [N, out] in input order, and how many keys were evicted for room."""
        n = len(keys)
        if n == 0:
            return np.zeros((0, self.model.config.output_size), dtype=np.float32), 0
        plan = _plan(keys, self.store.window)
        part_of_key = np.asarray(partitions, dtype=np.int64)[plan.first]
        slots, is_new, evicted = self.store.assign(plan.unique_keys, part_of_key, now)
        row_slots = slots[plan.rows]
        parts = [raw.reshape(-1), ts, plan.pos, row_slots, plan.lengths,
                 row_slots[is_new[plan.rows]], plan.window_pos]
        buf = np.concatenate(parts).astype(np.float64, copy=False)
        dev = self._staging.to_device(buf)  # the one copy in
        y = self._run(torch.split(dev, [len(p) for p in parts]), plan)
        return self._staging.to_host(y), evicted  # the one copy out

    def _run(self, buf: Sequence[torch.Tensor], plan: _Plan) -> torch.Tensor:
        if self.bucketed is not None and (y := self.bucketed.run(self, buf, plan)) is not None:
            return y
        store, r = self.store, self.spec.raw_width
        n, u, width = len(plan.pos), len(plan.rows), plan.width
        raw, ts, pos, slots, lengths, new, window_pos = buf
        raw, pos, slots, lengths = raw.view(n, r), pos.long(), slots.long(), lengths.long()
        if len(new):
            store.reset(new.long())
        dense = width == 1  # every key once: row u is event u (pos is 0..n-1), no padding
        if dense:
            raw_pad, ts_pad = raw.view(u, 1, r), ts.view(u, 1)
            prev_raw = store.prev_raw[slots].unsqueeze(1)
            prev_ts = store.prev_ts[slots].unsqueeze(1)
            has_prev = store.has_prev[slots].unsqueeze(1)
        else:
            # Lay events out as [U, T, ...] rows (one per key, longest first), padding at the end.
            raw_pad = raw.new_zeros(u * width, r).index_copy_(0, pos, raw).view(u, width, r)
            ts_pad = ts.new_zeros(u * width).index_copy_(0, pos, ts).view(u, width)
            prev_raw = torch.cat([store.prev_raw[slots].unsqueeze(1), raw_pad[:, :-1]], dim=1)
            prev_ts = torch.cat([store.prev_ts[slots].unsqueeze(1), ts_pad[:, :-1]], dim=1)
            has_prev = torch.ones(u, width, dtype=torch.bool, device=raw.device)
            has_prev[:, 0] = store.has_prev[slots]
        spec = self.spec
        feats = compute_features(spec, raw_pad, ts_pad, prev_raw, prev_ts, has_prev, torch.float64)
        valid = (torch.ones(u, 1, dtype=torch.bool, device=raw.device) if dense
                 else torch.arange(width, device=raw.device)[None, :] < lengths[:, None])
        x, loc, scale, stats, count = normalize_steps(
            spec, feats, raw_pad, prev_raw, has_prev, store.stats[slots], store.count[slots], valid
        )
        y, h, c = self.model.forward_padded(
            x, torch.from_numpy(plan.lengths), store.h[:, slots], store.c[:, slots],
            enforce_sorted=True,
        )
        out = serving_units(self.model, raw_pad, y, loc, scale)  # [U, T, out]
        # State guard: a key whose step or prediction is not finite keeps its state (a value
        # can overflow float32 only on the way to the target's units: see _finite_rows).
        ok = (None if dense and _all_finite(x, y, out, h, c)
              else _finite_rows((x, y, out), h, c, valid))
        saved = None if ok is None or bool(ok.all()) else _snapshot(store, slots)  # rare
        store.h[:, slots] = h
        store.c[:, slots] = c
        store.stats[slots] = stats
        store.count[slots] = count
        if dense:
            store.prev_raw[slots] = raw
            store.prev_ts[slots] = ts
        else:
            last = torch.arange(u, device=raw.device) * width + lengths - 1  # [U] flat index
            store.prev_raw[slots] = raw_pad.view(u * width, r)[last]
            store.prev_ts[slots] = ts_pad.view(-1)[last]
        store.has_prev[slots] = True
        self._append_window(x.view(u * width, -1), window_pos.long(), slots, lengths, width)
        if ok is not None and saved is not None:
            _restore_bad_rows(store, slots, saved, ok)
        out = out.view(u * width, -1)
        if not dense:  # back to input order
            out = out[pos]
        if ok is None or saved is None:
            return out
        return _nan_bad_rows(out, ok[pos // width])

    def _append_window(
        self, x: torch.Tensor, window_pos: torch.Tensor, slots: torch.Tensor,
        lengths: torch.Tensor, width: int,
    ) -> None:
        """Ring-buffer each key's last W features of the batch (chosen on the host, so no
        data-dependent mask syncs the device here)."""
        store, w = self.store, self.store.window
        if width == 1:  # every key once: its one event goes to its next ring position
            at = store.win_next[slots]
            store.win[slots, at] = x
            store.win_next[slots] = (at + 1) % w
            store.win_len[slots] = torch.clamp(store.win_len[slots] + 1, max=w)
            return
        row, col = window_pos // width, window_pos % width
        slot = slots[row]
        store.win[slot, (store.win_next[slot] + col) % w] = x[window_pos]
        store.win_next[slots] = (store.win_next[slots] + lengths) % w
        store.win_len[slots] = torch.clamp(store.win_len[slots] + lengths, max=w)

    @torch.inference_mode()
    def swap_model(self, model: LSTMModel, policy: SwapPolicy = "rewarm", chunk: int = 8192) -> int:
        """Serve ``model`` from now on; fix every live key's hidden state for it per ``policy``.

        rewarm: replay each key's buffered window through the new model from zeros;
        reset: start every key from zeros; keep: keep states (only when the shapes match).
        A model with another number of layers or hidden size gets a re-allocated state store
        (h and c of the new shape) and its keys re-warmed; ``keep`` is then refused.
        Returns the number of keys re-warmed.
        """
        old = self.model.config
        new = model.config
        if not same_features(model.spec, self.spec):
            raise ValueError("the new model reads different features; start a new deployment")
        reshaped = (new.num_layers, new.hidden_size) != (old.num_layers, old.hidden_size)
        if reshaped and policy == "keep":
            raise ValueError("the new model's state shape differs: keep is impossible, use rewarm")
        if reshaped:
            self.store.reshape(new.num_layers, new.hidden_size)
        self.model, self.spec = model.eval(), model.spec
        if policy == "keep":
            return 0
        if policy == "reset":
            self.store.reset_all()
            return 0
        return self._rewarm(chunk)

    def _rewarm(self, chunk: int) -> int:
        store = self.store
        store.reset_all()
        return self.rewarm(torch.from_numpy(store.live_slots()).to(store.device), chunk)

    @torch.inference_mode()
    def rewarm(self, slots: torch.Tensor, chunk: int = 8192) -> int:
        """Replay the buffered window of each of ``slots`` (int64, on the store's device)
        through the serving model from zeros, ``chunk`` keys at a time, and store the h and c
        it ends with; slots with an empty window are left as they are. Returns how many were
        re-warmed. Used by model swaps and by restoring state of another model version."""
        store = self.store
        live = slots[store.win_len[slots] > 0]
        for start in range(0, live.numel(), chunk):
            part = live[start:start + chunk]
            x, lengths = store.window_sequences(part)
            h0, c0 = self.model.zero_state(part.numel())
            _, h, c = self.model.forward_padded(x, lengths.cpu(), h0, c0)
            store.h[:, part] = h
            store.c[:, part] = c
        return int(live.numel())


def same_features(a: FeatureSpec, b: FeatureSpec) -> bool:
    """True when two specs compute the same model inputs and per-key state from events (the
    global normalization stats and the target may differ)."""
    return (a.kind, a.names, a.extras, a.half_life) == (b.kind, b.names, b.extras, b.half_life)


# --- state guard (project rule: a non-finite step never poisons a key's state) -------------
# A key whose step yields a non-finite feature, output or state keeps the state it had before
# the batch; all of that key's predictions in the batch come back NaN, and the service
# dead-letters them (reason non_finite_output). The key's later events continue from its last
# good state. Checking costs one reduction and one device sync per batch; only a batch with
# such a key pays for copying and restoring state.

def _snapshot(store: StateStore, slots: torch.Tensor) -> dict[str, torch.Tensor]:
    saved = {name: getattr(store, name)[slots] for name in ROW_TENSORS}
    saved["h"], saved["c"] = store.h[:, slots], store.c[:, slots]
    return saved


def serving_units(
    model: LSTMModel, raw: torch.Tensor, y: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """The prediction as served: head output y [..., out] to the target's next value in its
    units (float64 arithmetic, then float32) or class probabilities. raw [..., R] float64 the
    event's raw values (the last value of a change or log-return target); loc, scale [...] the
    key's statistics at the event (``streamer.features.normalize_steps``). -> [..., out]."""
    out = model.to_prediction(y)
    spec, col = model.spec, model.spec.target_raw_column
    if model.config.task != "classification" and col is not None:
        value = to_value(spec, out[..., 0].double(), raw[..., col], loc, scale)
        out = value.to(torch.float32).unsqueeze(-1)
    return out


def _finite_rows(
    steps: Sequence[torch.Tensor], h: torch.Tensor, c: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """[U] bool: row u's per-step tensors (``steps``: features, outputs, predictions, each
    [U, T, ...]) at its valid steps, and its final state h, c [L, U, H], are all finite.
    ``v * 0`` is 0 for finite v and NaN for NaN or inf, so a sum of them is an exact test (and
    ~10x faster than isfinite().all() per dim)."""
    u, width = valid.shape  # valid: [U, T] bool, the row's real steps
    total = sum((t.reshape(u, width, -1) * 0).sum(-1) for t in steps)
    row = torch.where(valid, total, 0.0).sum(1)  # padding may hold anything
    return torch.isfinite(row + (h * 0).sum((0, 2)) + (c * 0).sum((0, 2)))


def _all_finite(*tensors: torch.Tensor) -> bool:
    """True when every element of ``tensors`` is finite: a NaN or inf anywhere makes its sum
    non-finite, so one finite sum proves them all (one host sync). A sum that overflows is a
    false alarm the caller settles with the exact per-row check (:func:`_finite_rows`)."""
    total = tensors[0].sum()
    for t in tensors[1:]:
        total = total + t.sum()
    return bool(torch.isfinite(total))


def _restore_bad_rows(
    store: StateStore, slots: torch.Tensor, saved: dict[str, torch.Tensor], ok: torch.Tensor
) -> None:
    for name in ROW_TENSORS:
        tensor, old = getattr(store, name), saved[name]
        keep = ok.view(-1, *([1] * (old.dim() - 1)))
        tensor[slots] = torch.where(keep, tensor[slots], old)
    keep = ok.view(1, -1, 1)
    store.h[:, slots] = torch.where(keep, store.h[:, slots], saved["h"])
    store.c[:, slots] = torch.where(keep, store.c[:, slots], saved["c"])


def _nan_bad_rows(pred: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    return torch.where(ok[:, None], pred, torch.full_like(pred, float("nan")))


class _Plan:
    """Host-side layout of a batch: distinct keys, their row order, each event's flat slot."""

    __slots__ = ("unique_keys", "first", "rows", "lengths", "width", "pos", "window_pos")

    def __init__(
        self, unique_keys: list[str], first: np.ndarray, rows: np.ndarray,
        lengths: np.ndarray, width: int, pos: np.ndarray, window_pos: np.ndarray,
    ) -> None:
        self.unique_keys = unique_keys  # [U] in first-seen order
        self.first = first  # [U] index of each key's first event
        self.rows = rows  # [U] key (group) index of each row, longest row first
        self.lengths = lengths  # [U] events per row
        self.width = width  # T: the longest row
        self.pos = pos  # [N] float: row * T + rank of the event within its key
        self.window_pos = window_pos  # [K] pos of the events among their key's last W


def _plan(keys: Sequence[str], window: int) -> _Plan:
    unique = list(dict.fromkeys(keys))  # first-seen order, in C
    if len(unique) == len(keys):  # every key once (light traffic): row u is event u
        n = len(keys)
        at = np.arange(n, dtype=np.int64)
        at_f = at.astype(np.float64)
        return _Plan(unique, at, at, np.ones(n, dtype=np.int64), 1, at_f, at_f)  # window >= 1
    group_of = dict(zip(unique, range(len(unique)), strict=True))
    groups = np.fromiter(map(group_of.__getitem__, keys), dtype=np.int64, count=len(keys))
    counts = np.bincount(groups)
    order = np.argsort(groups, kind="stable")  # events grouped by key, offset order inside
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(len(keys), dtype=np.int64)
    rank[order] = np.arange(len(keys)) - starts[groups[order]]
    rows = np.argsort(-counts, kind="stable")  # longest first, as pack_padded_sequence wants
    row_of_group = np.empty_like(rows)
    row_of_group[rows] = np.arange(len(rows))
    width = int(counts.max())
    pos = row_of_group[groups] * width + rank
    first = order[starts]
    window_pos = pos[rank >= counts[groups] - window]
    return _Plan(unique, first, rows, counts[rows], width, pos.astype(np.float64),
                 window_pos.astype(np.float64))

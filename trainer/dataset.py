"""The training set: every key as one padded row, three time-ordered windows, and predictions.

Why three windows: early stopping and the choice of depth, hidden size, dropout and weight
decay read the validation window; the gate reads only the final test window, which nothing
else has seen, so the number it compares is an honest preview of serving error. Every window
is cut at a global time, so each window's targets are later than every earlier window's, the
way the model meets the future. A step still *reads* its key's earlier events (its past), but
nothing at or after the first cut feeds a gradient or the global normalization statistics.

Model inputs come from ``streamer.features.sequence_inputs``, the code the streamer runs, so
per-key normalization and target kinds are identical in training and serving.

Usage::

    data = build_dataset(history, val_fraction=0.2, test_fraction=0.2)
    pred = predict(model, data)          # [K, T, out]: next value (or class probabilities)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from streamer.errors import ConfigError
from streamer.features import FeatureSpec, model_target, sequence_inputs, to_value
from streamer.model import LSTMModel
from trainer.data import History

_PREDICT_CHUNK = 2048  # time steps per forward when predicting; bounds activation memory
WARMUP = 2  # per-key normalization: a key's first steps are not training pairs


def is_change_target(spec: FeatureSpec) -> bool:
    """True when the target is itself a change (a tick's log return), not a level.

    Then "the next move" is the next value's sign, not next minus last: a return of +0.1%
    after +0.2% is still an up-tick.
    """
    return spec.kind == "tick" and spec.target == "log_return"


def move_classes(move: np.ndarray, band: float) -> np.ndarray:
    """0 down, 1 flat (|move| <= band), 2 up; the order of streamer.model.CLASSES."""
    return np.where(move > band, 2, np.where(move < -band, 0, 1)).astype(np.int64)


@dataclass
class Dataset:
    """Every key as one zero-padded row; step t predicts event t+1 of the same key."""

    spec: FeatureSpec  # carries global normalization stats fitted on the training part only
    keys: list[str]
    x: np.ndarray  # [K, T, F] float32 model inputs (per-key normalized; the model's global
    #                normalization comes on top)
    lengths: np.ndarray  # [K] events per key
    last: np.ndarray  # [K, T] float64 target value at step t (a tick: its log return)
    next: np.ndarray  # [K, T] float64 target value at step t+1 (0 where there is none)
    loc: np.ndarray  # [K, T] float64 per-key target location (streamer.features)
    scale: np.ndarray  # [K, T] float64 per-key target scale
    train: np.ndarray  # [K, T] bool: step t is a training pair (event t+1 before cut 1)
    val: np.ndarray  # [K, T] bool: validation pair (event t+1 in [cut 1, cut 2))
    test: np.ndarray  # [K, T] bool: test pair (event t+1 at/after cut 2; empty without one)
    cut: float  # epoch seconds: start of validation
    split: dict[str, Any] = field(default_factory=dict)
    next_ts: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))  # [K, T] ts of t+1

    def score_range(self, start: float | None, end: float | None) -> int:
        """Make the test window exactly the pairs whose target event has ``start <= ts < end``
        (the events before stay as warm-up: the model reads them); baselines fit only on pairs
        before ``start``. Returns the number of pairs in the range."""
        lo = -np.inf if start is None else start
        hi = np.inf if end is None else end
        defined = np.arange(self.next_ts.shape[1])[None, :] < (self.lengths[:, None] - 1)
        self.test = defined & (self.next_ts >= lo) & (self.next_ts < hi)
        self.train = self.train & (self.next_ts < lo)
        self.split = {**self.split, "test_pairs": int(self.test.sum()), "from_ts": start,
                      "until_ts": end}
        return int(self.test.sum())

    @property
    def moves(self) -> np.ndarray:
        return self.next if is_change_target(self.spec) else self.next - self.last

    def labels(self, band: float) -> np.ndarray:
        return move_classes(self.moves, band)

    def window(self, name: str) -> np.ndarray:
        """The [K, T] mask of ``train``, ``val`` or ``test`` (``test`` falls back to ``val``
        when there is no test window)."""
        if name == "test" and not self.test.any():
            return self.val
        mask: np.ndarray = getattr(self, name)
        return mask

    def model_targets(self) -> np.ndarray:
        """[K, T] float64: the model-space target of every step (0 where undefined)."""
        if self.spec.target_raw_column is None:
            return self.next.copy()
        with np.errstate(all="ignore"):
            y = model_target(self.spec, *(torch.from_numpy(a) for a in (
                self.next, self.last, self.loc, self.scale))).numpy()
        return np.where(np.isfinite(y), y, 0.0)


def build_dataset(
    history: History, val_fraction: float = 0.2, test_fraction: float = 0.0
) -> Dataset:
    """Cut at two global times and fit the global normalization on events before the first."""
    if not 0.0 < val_fraction < 1.0 or not 0.0 <= test_fraction < 1.0 or (
            val_fraction + test_fraction >= 1.0):
        raise ConfigError("val_fraction", f"validation {val_fraction} and test {test_fraction} "
                          "fractions must be in [0, 1) and leave a training part")
    keys = sorted(history.series)
    all_ts = np.concatenate([history.series[k].ts for k in keys]) if keys else np.zeros(0)
    if all_ts.size < 4:
        raise ConfigError("input", f"{all_ts.size} events is too little history to train on")
    ordered = np.sort(all_ts)
    cut = float(ordered[int(all_ts.size * (1.0 - val_fraction - test_fraction))])
    cut2 = float(ordered[int(all_ts.size * (1.0 - test_fraction))]) if test_fraction else np.inf
    spec = history.spec
    k, t_max = len(keys), max(len(history.series[k].ts) for k in keys)
    x = np.zeros((k, t_max, spec.n_inputs), dtype=np.float32)
    last, nxt = np.zeros((k, t_max)), np.zeros((k, t_max))
    loc, scale = np.zeros((k, t_max)), np.ones((k, t_max))
    masks = {name: np.zeros((k, t_max), dtype=bool) for name in ("train", "val", "test")}
    before = np.zeros((k, t_max), dtype=bool)  # events before the first cut
    next_ts = np.full((k, t_max), np.inf)
    lengths = np.zeros(k, dtype=np.int64)
    col = spec.target_raw_column
    for i, key in enumerate(keys):
        s = history.series[key]
        n = len(s.ts)
        z, lo, sc = sequence_inputs(spec, torch.from_numpy(s.raw), torch.from_numpy(s.ts))
        x[i, :n], loc[i, :n], scale[i, :n], lengths[i] = z.numpy(), lo.numpy(), sc.numpy(), n
        series = s.raw[:, col] if col is not None else z.numpy()[:, spec.target_index]
        last[i, :n], nxt[i, : n - 1] = series, series[1:]
        after = s.ts[1:]
        next_ts[i, : n - 1] = after
        before[i, :n] = s.ts < cut
        first = WARMUP if spec.half_life is not None else 0
        masks["train"][i, first : n - 1] = after[first:] < cut
        masks["val"][i, : n - 1] = (after >= cut) & (after < cut2)
        masks["test"][i, : n - 1] = after >= cut2
    if not masks["train"].any() or not masks["val"].any():
        raise ConfigError("val_fraction", "the time cut leaves no training or no validation pair")
    data = Dataset(spec, keys, x, lengths, last, nxt, loc, scale, masks["train"], masks["val"],
                   masks["test"], cut, next_ts=next_ts)
    mean, std = _stats(x, before)
    data.spec = spec.with_stats(mean, std, _target_stats(data))
    data.split = {
        "cut_ts": cut, "test_cut_ts": None if np.isinf(cut2) else cut2,
        "train_pairs": int(masks["train"].sum()), "val_pairs": int(masks["val"].sum()),
        "test_pairs": int(masks["test"].sum()), "val_fraction": val_fraction,
        "test_fraction": test_fraction,
    }
    return data


def _stats(x: np.ndarray, before: np.ndarray) -> tuple[list[float], list[float]]:
    rows = x[before].astype(np.float64)
    mean, std = rows.mean(axis=0), rows.std(axis=0)
    if not (np.isfinite(mean).all() and np.isfinite(std).all()):
        raise ConfigError("input", "training features contain non-finite values")
    std = np.where(std > 1e-12, std, 1.0)  # a constant feature: leave it unscaled
    return mean.tolist(), std.tolist()


def _target_stats(data: Dataset) -> tuple[float, float] | None:
    """(mean, std) of the model-space target on training pairs; a change target keeps mean 0
    so that a zero output means "no change" (the model's worst case is persistence)."""
    if data.spec.target_raw_column is None:
        return None  # a tick's log return is one of the inputs: the input stats serve
    y = data.model_targets()[data.train]
    if data.spec.target_kind == "level":
        std = float(y.std())
        return float(y.mean()), std if std > 1e-12 else 1.0
    rms = float(np.sqrt(np.mean(y * y))) if y.size else 1.0
    return 0.0, rms if rms > 1e-12 else 1.0


@torch.no_grad()
def predict(model: LSTMModel, data: Dataset, batch_keys: int = 1024) -> np.ndarray:
    """[K, T, out] predictions at every step: the next value in the target's units (a tick:
    the next log return), or class probabilities."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    k, t_max, _ = data.x.shape
    out = np.zeros((k, t_max, model.config.output_size), dtype=np.float64)
    for start in range(0, k, batch_keys):
        rows = slice(start, start + batch_keys)
        t_end = int(data.lengths[rows].max())
        state = None
        for t0 in range(0, t_end, _PREDICT_CHUNK):
            xb = torch.from_numpy(data.x[rows, t0 : min(t0 + _PREDICT_CHUNK, t_end)]).to(device)
            y, state = model(xb, state)
            out[rows, t0 : t0 + xb.shape[1]] = model.to_prediction(y).double().cpu().numpy()
    model.train(was_training)
    if model.config.task == "regression" and data.spec.target_raw_column is not None:
        out[..., 0] = to_value(data.spec, *(torch.from_numpy(a) for a in (
            out[..., 0], data.last, data.loc, data.scale))).numpy()
    return out

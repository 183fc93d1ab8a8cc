"""Training: time split without leakage, truncated BPTT batched across keys, depth selection.

Why a global time cut: every validation target is later than every training target, the way
the model will meet the future, so validation error is an honest preview of serving error.
A validation step still *reads* the key's earlier events (they are its past), but nothing
at or after the cut ever feeds a gradient or the normalization statistics.

Why truncated BPTT across keys: keys are rows of one batch and time is cut into chunks of
``seq_len`` steps; the LSTM state is carried (detached) from chunk to chunk, so the model
learns from long histories at the memory cost of ``seq_len`` steps, like the streamer, which
also carries state forever.

Usage::

    data = build_dataset(history, val_fraction=0.2)
    result = train_model(data, TrainOptions(hidden=(32, 64), layers=None), device="cpu")
    result.model, result.candidates      # chosen model, every candidate's validation score
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torch import nn

from streamer.errors import ConfigError
from streamer.features import FeatureSpec
from streamer.model import LSTMModel, ModelConfig, Task
from trainer.data import History

log = logging.getLogger(__name__)

AUTO_DEPTHS = (1, 2, 3)
_PREDICT_CHUNK = 2048  # time steps per forward when predicting; bounds activation memory


@dataclass(frozen=True)
class TrainOptions:
    task: Task = "regression"
    flat_band: float = 0.0
    hidden: tuple[int, ...] = (64,)
    layers: int | None = 2  # None: try AUTO_DEPTHS and keep the smallest good enough
    epochs: int = 30
    seq_len: int = 64
    batch_keys: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    dropout: float = 0.0
    patience: int = 5
    clip: float = 1.0
    seed: int = 0
    tolerance: float = 0.01  # auto: within this relative distance of the best val loss


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device", "cuda was asked for but no CUDA device is available")
    return torch.device(name)


# --- the dataset ----------------------------------------------------------------------------


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

    spec: FeatureSpec  # carries normalization stats fitted on the training part only
    keys: list[str]
    x: np.ndarray  # [K, T, F] float32 un-normalized features (the model normalizes)
    lengths: np.ndarray  # [K] events per key
    last: np.ndarray  # [K, T] float64 target feature at step t
    next: np.ndarray  # [K, T] float64 target feature at step t+1 (0 where there is none)
    train: np.ndarray  # [K, T] bool: step t is a training pair (event t+1 before the cut)
    val: np.ndarray  # [K, T] bool: step t is a validation pair (event t+1 at/after the cut)
    cut: float  # epoch seconds
    split: dict[str, Any] = field(default_factory=dict)

    @property
    def moves(self) -> np.ndarray:
        return self.next if is_change_target(self.spec) else self.next - self.last

    def labels(self, band: float) -> np.ndarray:
        return move_classes(self.moves, band)


def build_dataset(history: History, val_fraction: float = 0.2) -> Dataset:
    """Split at one global time cut and fit normalization on events before it."""
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError("val_fraction", f"must be in (0, 1), got {val_fraction}")
    keys = sorted(history.series)
    all_ts = np.concatenate([history.series[k].ts for k in keys]) if keys else np.zeros(0)
    if all_ts.size < 4:
        raise ConfigError("input", f"{all_ts.size} events is too little history to train on")
    cut = float(np.sort(all_ts)[int(all_ts.size * (1.0 - val_fraction))])
    spec, ti = history.spec, history.spec.target_index
    k, t_max, f = len(keys), max(len(history.series[k].ts) for k in keys), spec.n_features
    x = np.zeros((k, t_max, f), dtype=np.float32)
    last = np.zeros((k, t_max))
    nxt = np.zeros((k, t_max))
    train = np.zeros((k, t_max), dtype=bool)
    val = np.zeros((k, t_max), dtype=bool)
    lengths = np.zeros(k, dtype=np.int64)
    for i, key in enumerate(keys):
        ts, feats = history.series[key].ts, history.features(key)
        n = len(ts)
        x[i, :n], last[i, :n], lengths[i] = feats, feats[:, ti], n
        nxt[i, : n - 1] = feats[1:, ti]
        train[i, : n - 1] = ts[1:] < cut
        val[i, : n - 1] = ts[1:] >= cut
    if not train.any() or not val.any():
        raise ConfigError("val_fraction", "the time cut leaves no training or no validation pair")
    spec = spec.with_stats(*_stats(x, lengths, [history.series[k].ts for k in keys], cut))
    split = {
        "cut_ts": cut, "train_pairs": int(train.sum()), "val_pairs": int(val.sum()),
        "val_fraction": val_fraction,
    }
    return Dataset(spec, keys, x, lengths, last, nxt, train, val, cut, split)


def _stats(
    x: np.ndarray, lengths: np.ndarray, ts: list[np.ndarray], cut: float
) -> tuple[list[float], list[float]]:
    rows = np.concatenate([x[i, : lengths[i]][t < cut] for i, t in enumerate(ts)], axis=0)
    mean = rows.astype(np.float64).mean(axis=0)
    std = rows.astype(np.float64).std(axis=0)
    if not (np.isfinite(mean).all() and np.isfinite(std).all()):
        raise ConfigError("input", "training features contain non-finite values")
    std = np.where(std > 1e-12, std, 1.0)  # a constant feature: leave it unscaled
    return mean.tolist(), std.tolist()


# --- running a model over the dataset -----------------------------------------------------


@torch.no_grad()
def predict(model: LSTMModel, data: Dataset, batch_keys: int = 1024) -> np.ndarray:
    """[K, T, out] serving-unit predictions (value, or class probabilities) at every step."""
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
    return out


def validation_loss(model: LSTMModel, data: Dataset, pred: np.ndarray) -> float:
    """The early-stopping criterion: normalized MSE, or cross-entropy, on validation pairs."""
    mask = data.val
    if model.config.task == "classification":
        labels = data.labels(model.config.flat_band)[mask]
        p = pred[mask][np.arange(labels.size), labels]
        return float(-np.log(np.clip(p, 1e-12, None)).mean())
    y_std = model.spec.std[model.spec.target_index]  # the model's own scale, not the data's
    err = (pred[..., 0][mask] - data.next[mask]) / y_std
    return float(np.mean(err**2))


def validation_score(model: LSTMModel, data: Dataset, pred: np.ndarray) -> dict[str, float]:
    """The human-readable score per candidate: MAE, or accuracy for classification."""
    mask = data.val
    if model.config.task == "classification":
        labels = data.labels(model.config.flat_band)[mask]
        return {"accuracy": float((pred[mask].argmax(-1) == labels).mean())}
    return {"mae": float(np.abs(pred[..., 0][mask] - data.next[mask]).mean())}


# --- fitting one model ----------------------------------------------------------------------


@dataclass
class Candidate:
    layers: int
    hidden: int
    params: int
    val_loss: float
    score: dict[str, float]
    epochs: int  # epochs run (early stopping may cut them short)
    best_epoch: int
    seconds: float
    chosen: bool = False
    curve: dict[str, list[float]] = field(default_factory=dict)  # loss per epoch, train/val

    def as_dict(self) -> dict[str, Any]:
        return {
            "layers": self.layers, "hidden": self.hidden, "params": self.params,
            "val_loss": self.val_loss, **self.score, "epochs": self.epochs,
            "best_epoch": self.best_epoch, "seconds": round(self.seconds, 3),
            "chosen": self.chosen, "curve": self.curve,
        }


def fit(
    data: Dataset,
    config: ModelConfig,
    options: TrainOptions,
    device: torch.device,
    progress: _Progress | None = None,
) -> tuple[LSTMModel, Candidate]:
    """Train one configuration with early stopping; returns its best-epoch weights."""
    started = time.monotonic()
    torch.manual_seed(options.seed)
    model = LSTMModel(config, data.spec).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=options.lr, weight_decay=options.weight_decay)
    rng = np.random.default_rng(options.seed)
    tensors = _TrainTensors(data, config, device)
    best_loss, best_epoch, best_state, epochs_run = math.inf, 0, None, 0
    task = progress.add(config) if progress else None
    curve: dict[str, list[float]] = {"train": [], "validation": []}
    for epoch in range(1, options.epochs + 1):
        train_loss = _train_epoch(model, opt, tensors, options, rng)
        pred = predict(model, data)
        loss = validation_loss(model, data, pred)
        epochs_run = epoch
        curve["train"].append(train_loss)
        curve["validation"].append(loss)
        if loss < best_loss and (best_state is None or best_loss - loss > 1e-6 * best_loss):
            best_loss, best_epoch = loss, epoch
            best_state = copy.deepcopy(model.state_dict())
        if progress is not None and task is not None:
            progress.epoch(task, train_loss, loss, best_loss)
        if not math.isfinite(loss) or epoch - best_epoch >= options.patience:
            break
    if best_state is None:  # no epoch ran (epochs=0) or every loss was NaN
        best_loss = validation_loss(model, data, predict(model, data))
    else:
        model.load_state_dict(best_state)
    if progress is not None and task is not None:
        progress.finish(task, best_epoch)
    model = model.eval()
    score = validation_score(model, data, predict(model, data))
    params = sum(p.numel() for p in model.parameters())
    cand = Candidate(config.num_layers, config.hidden_size, params, best_loss, score,
                     epochs_run, best_epoch, time.monotonic() - started, curve=curve)
    return model, cand


class _TrainTensors:
    """The training part on the device, keys grouped into length-sorted batches."""

    def __init__(self, data: Dataset, config: ModelConfig, device: torch.device) -> None:
        # Only steps up to each key's last training pair are ever fed: nothing after the cut.
        train_len = np.where(data.train.any(1), data.train.shape[1] - np.argmax(
            data.train[:, ::-1], axis=1), 0)
        keep = np.flatnonzero(train_len > 0)
        self.order = keep[np.argsort(-train_len[keep], kind="stable")]
        self.train_len = train_len
        t = int(train_len.max())
        self.x = torch.from_numpy(data.x[:, :t]).to(device)  # [K, T, F]
        self.mask = torch.from_numpy(data.train[:, :t]).to(device)  # [K, T]
        if config.task == "classification":
            self.y = torch.from_numpy(data.labels(config.flat_band)[:, :t]).to(device)
        else:
            t_idx = data.spec.target_index
            y = (data.next[:, :t] - data.spec.mean[t_idx]) / data.spec.std[t_idx]
            self.y = torch.from_numpy(y.astype(np.float32)).to(device)  # [K, T] normalized
        self.task = config.task

    def batches(self, batch_keys: int, rng: np.random.Generator) -> list[np.ndarray]:
        groups = [self.order[i : i + batch_keys] for i in range(0, len(self.order), batch_keys)]
        return [groups[i] for i in rng.permutation(len(groups))]

    def loss(self, y: torch.Tensor, rows: torch.Tensor, t0: int, t1: int) -> torch.Tensor:
        mask = self.mask[rows, t0:t1]
        target = self.y[rows, t0:t1][mask]
        if self.task == "classification":
            return nn.functional.cross_entropy(y[mask], target)
        return nn.functional.mse_loss(y[..., 0][mask], target)


def _train_epoch(
    model: LSTMModel,
    opt: torch.optim.Optimizer,
    tensors: _TrainTensors,
    options: TrainOptions,
    rng: np.random.Generator,
) -> float:
    model.train()
    total, count = 0.0, 0
    for group in tensors.batches(options.batch_keys, rng):
        rows = torch.from_numpy(group).to(tensors.x.device)
        t_end = int(tensors.train_len[group].max())
        state: tuple[torch.Tensor, torch.Tensor] | None = None
        for t0 in range(0, t_end, options.seq_len):
            t1 = min(t0 + options.seq_len, t_end)
            y, (h, c) = model(tensors.x[rows, t0:t1], state)
            state = (h.detach(), c.detach())  # truncate: no gradient into earlier chunks
            n = int(tensors.mask[rows, t0:t1].sum())
            if n == 0:
                continue
            loss = tensors.loss(y, rows, t0, t1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), options.clip)
            opt.step()
            total, count = total + loss.item() * n, count + n
    return total / max(count, 1)


# --- depth selection ------------------------------------------------------------------------


@dataclass
class TrainResult:
    model: LSTMModel
    candidates: list[Candidate]

    @property
    def chosen(self) -> Candidate:
        return next(c for c in self.candidates if c.chosen)


def candidate_configs(data: Dataset, options: TrainOptions) -> list[ModelConfig]:
    depths = AUTO_DEPTHS if options.layers is None else (options.layers,)
    return [
        ModelConfig(
            input_size=data.spec.n_features, hidden_size=h, num_layers=depth,
            dropout=options.dropout, task=options.task, flat_band=options.flat_band,
        )
        for h in options.hidden for depth in depths
    ]


def choose(candidates: list[Candidate], tolerance: float) -> int:
    """The smallest candidate whose val loss is within ``tolerance`` (relative) of the best:
    a deeper or wider model has to earn its serving cost with evidence."""
    best = min(c.val_loss for c in candidates)
    good = [i for i, c in enumerate(candidates) if c.val_loss <= best + tolerance * abs(best)]
    return min(good, key=lambda i: (candidates[i].params, candidates[i].layers))


def train_model(
    data: Dataset,
    options: TrainOptions,
    device: torch.device | str = "cpu",
    progress: bool = False,
    console: Console | None = None,
) -> TrainResult:
    """Train every candidate configuration and keep the chosen one (see :func:`choose`)."""
    device = torch.device(device)
    configs = candidate_configs(data, options)
    models: list[LSTMModel] = []
    candidates: list[Candidate] = []
    with _progress(progress, options.epochs, console) as bar:
        for config in configs:
            model, cand = fit(data, config, options, device, bar)
            models.append(model.cpu())
            candidates.append(cand)
            log.info("candidate layers=%d hidden=%d val_loss=%.5f %s", cand.layers,
                     cand.hidden, cand.val_loss, cand.score)
    index = choose(candidates, options.tolerance)
    candidates[index].chosen = True
    return TrainResult(models[index], candidates)


# --- progress display -----------------------------------------------------------------------


class _Progress:
    """One bar per candidate: epoch count, train and validation loss, time left."""

    def __init__(self, epochs: int, console: Console | None) -> None:
        self.epochs = epochs
        self.bar = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("train {task.fields[train]}"), TextColumn("val {task.fields[val]}"),
            TextColumn("best {task.fields[best]}"), TimeElapsedColumn(), TimeRemainingColumn(),
            console=console or Console(stderr=True), transient=False,
        )

    def add(self, config: ModelConfig) -> TaskID:
        return self.bar.add_task(
            f"layers={config.num_layers} hidden={config.hidden_size}", total=self.epochs,
            train="-", val="-", best="-",
        )

    def epoch(self, task: TaskID, train: float, val: float, best: float) -> None:
        self.bar.update(task, advance=1, train=f"{train:.4f}", val=f"{val:.4f}",
                        best=f"{best:.4f}")

    def finish(self, task: TaskID, best_epoch: int) -> None:
        """Early stopping ends a bar short; fill it and say which epoch was kept."""
        desc = self.bar.tasks[task].description
        self.bar.update(task, completed=self.epochs, description=f"{desc} (best {best_epoch})")


@contextmanager
def _progress(enabled: bool, epochs: int, console: Console | None) -> Iterator[_Progress | None]:
    if not enabled:
        yield None
        return
    view = _Progress(epochs, console)
    with view.bar:
        yield view

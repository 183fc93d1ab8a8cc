"""Fitting one model configuration: truncated BPTT batched across keys, early stopping.

Why truncated BPTT across keys: keys are rows of one batch and time is cut into chunks of
``seq_len`` steps; the LSTM state is carried (detached) from chunk to chunk, so the model
learns from long histories at the memory cost of ``seq_len`` steps, like the streamer, which
also carries state forever. Early stopping reads only the validation window
(``trainer.dataset``); the data split, the search over configurations (``trainer.search``) and
the progress display (``trainer.progress``) live in their own modules.

Usage::

    model, candidate = fit(data, ModelConfig(input_size=data.spec.n_inputs), options, device)
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from streamer.model import LSTMModel, ModelConfig, Task
from trainer.dataset import Dataset, predict
from trainer.progress import TrainingProgress

log = logging.getLogger(__name__)

AUTO_DEPTHS = (1, 2, 3)
TARGET_CLIP = 20.0  # a training target beyond this many target std devs is clipped


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
    weight_decay: tuple[float, ...] = (1e-4,)  # candidates to choose from on validation
    dropout: tuple[float, ...] = (0.0,)  # candidates (between stacked layers)
    patience: int = 5
    clip: float = 1.0
    seed: int = 0
    tolerance: float = 0.01  # auto: within this relative distance of the best val loss
    folds: int = 1  # rolling-origin backtest folds (1: the validation window alone)


# --- scoring on the validation window -------------------------------------------------------


def validation_loss(model: LSTMModel, data: Dataset, pred: np.ndarray) -> float:
    """The early-stopping criterion: normalized MSE, or cross-entropy, on validation pairs."""
    mask = data.val
    if model.config.task == "classification":
        labels = data.labels(model.config.flat_band)[mask]
        p = pred[mask][np.arange(labels.size), labels]
        return float(-np.log(np.clip(p, 1e-12, None)).mean())
    y_std = model.spec.target_norm[1]  # the model's own scale, not the data's
    err = (pred[..., 0][mask] - data.next[mask]) / (data.scale[mask] * y_std)
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
    dropout: float
    weight_decay: float
    params: int
    val_loss: float
    score: dict[str, float]
    epochs: int  # epochs run (early stopping may cut them short)
    best_epoch: int
    seconds: float
    chosen: bool = False
    curve: dict[str, list[float]] = field(default_factory=dict)  # loss per epoch, train/val
    fold_losses: list[float] | None = None  # with --folds: each fold's val loss (last: newest)

    def as_dict(self) -> dict[str, Any]:
        return {
            "layers": self.layers, "hidden": self.hidden, "dropout": self.dropout,
            "weight_decay": self.weight_decay, "params": self.params,
            "val_loss": self.val_loss, **self.score, "epochs": self.epochs,
            "best_epoch": self.best_epoch, "seconds": round(self.seconds, 3),
            "chosen": self.chosen, "curve": self.curve, "fold_losses": self.fold_losses,
        }


def fit(
    data: Dataset,
    config: ModelConfig,
    options: TrainOptions,
    device: torch.device,
    progress: TrainingProgress | None = None,
    weight_decay: float | None = None,
) -> tuple[LSTMModel, Candidate]:
    """Train one configuration with early stopping on the validation window; returns its
    best-epoch weights. ``weight_decay`` defaults to the first of ``options.weight_decay``."""
    wd = options.weight_decay[0] if weight_decay is None else weight_decay
    started = time.monotonic()
    torch.manual_seed(options.seed)
    model = LSTMModel(config, data.spec).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=options.lr, weight_decay=wd)
    rng = np.random.default_rng(options.seed)
    tensors = _TrainTensors(data, config, device)
    best_loss, best_epoch, best_state, epochs_run = math.inf, 0, None, 0
    task = progress.add(config, wd) if progress else None
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
    cand = Candidate(config.num_layers, config.hidden_size, config.dropout, wd, params,
                     best_loss, score, epochs_run, best_epoch, time.monotonic() - started,
                     curve=curve)
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
            y_mean, y_std = data.spec.target_norm
            y = np.clip((data.model_targets()[:, :t] - y_mean) / y_std, -TARGET_CLIP, TARGET_CLIP)
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

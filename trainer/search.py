"""Model selection: every candidate (depth x hidden size x dropout x weight decay) is fitted
with early stopping on the validation window; the smallest one within ``tolerance`` of the best
validation loss is kept, so a deeper or wider model has to earn its serving cost with evidence.
The test window is never read here (the gate reads it).

Usage::

    result = train_model(data, TrainOptions(hidden=(32, 64), layers=None), device="cpu")
    result.model, result.candidates
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np
import torch
from rich.console import Console

from streamer.errors import ConfigError
from streamer.model import LSTMModel, ModelConfig
from trainer.dataset import Dataset
from trainer.progress import training_progress
from trainer.train import AUTO_DEPTHS, Candidate, TrainOptions, fit

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    model: LSTMModel
    candidates: list[Candidate]

    @property
    def chosen(self) -> Candidate:
        return next(c for c in self.candidates if c.chosen)


def candidate_configs(data: Dataset, options: TrainOptions) -> list[tuple[ModelConfig, float]]:
    """Every (configuration, weight decay) to fit: depth x hidden x dropout x weight decay.
    Dropout acts between stacked layers only, so a 1-layer model is tried once without it."""
    depths = AUTO_DEPTHS if options.layers is None else (options.layers,)
    out: list[tuple[ModelConfig, float]] = []
    for depth in depths:
        for h in options.hidden:
            for dropout in (options.dropout if depth > 1 else (0.0,)):
                for wd in options.weight_decay:
                    cfg = ModelConfig(
                        input_size=data.spec.n_inputs, hidden_size=h, num_layers=depth,
                        dropout=dropout, task=options.task, flat_band=options.flat_band,
                    )
                    if (cfg, wd) not in out:
                        out.append((cfg, wd))
    return out


def rolling_origin_folds(data: Dataset, folds: int) -> list[Dataset]:
    """The ``folds - 1`` earlier backtest splits of a rolling-origin evaluation (the last fold
    is ``data``'s own train/validation split): the pairs before the validation cut are divided
    in time; fold j trains on everything before its origin and validates on the next block, so
    a choice has to hold across seasons, not just in the newest weeks. The test window is never
    touched. The global normalization stays the one fitted on the full training part."""
    if folds <= 1:
        return []
    times = data.next_ts[data.train]
    if times.size < 4 * folds:
        raise ConfigError("folds", f"{times.size} training pairs are too few for {folds} folds")
    edges = np.quantile(times, np.linspace(0.5, 1.0, folds))  # origins, then the cut
    out = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        out.append(replace(data, train=data.train & (data.next_ts < lo),
                           val=data.train & (data.next_ts >= lo) & (data.next_ts < hi)))
    return out


def choose(candidates: list[Candidate], tolerance: float) -> int:
    """The smallest candidate whose val loss is within ``tolerance`` (relative) of the best:
    a deeper or wider model has to earn its serving cost with evidence."""
    best = min(c.val_loss for c in candidates)
    good = [i for i, c in enumerate(candidates) if c.val_loss <= best + tolerance * abs(best)]
    return min(good, key=lambda i: (candidates[i].params, candidates[i].layers,
                                    candidates[i].val_loss))


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
    folds = rolling_origin_folds(data, options.folds)
    with training_progress(progress, options.epochs, console) as bar:
        for config, wd in configs:
            fold_losses = [fit(fold, config, options, device, bar, weight_decay=wd)[1].val_loss
                           for fold in folds]
            model, cand = fit(data, config, options, device, bar, weight_decay=wd)
            if fold_losses:
                cand.fold_losses = [*fold_losses, cand.val_loss]
                cand.val_loss = float(np.mean(cand.fold_losses))
            models.append(model.cpu())
            candidates.append(cand)
            log.info("candidate layers=%d hidden=%d dropout=%g wd=%g val_loss=%.5f %s",
                     cand.layers, cand.hidden, cand.dropout, cand.weight_decay, cand.val_loss,
                     cand.score)
    index = choose(candidates, options.tolerance)
    candidates[index].chosen = True
    return TrainResult(models[index], candidates)



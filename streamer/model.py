"""The stacked LSTM with a linear head, and its two ways of running.

``forward_padded`` runs whole (padded, variable-length) sequences; ``step`` advances a batch of
keys by one event. ``step`` runs the weights of the same ``nn.LSTM`` one layer at a time through
``torch.lstm_cell`` (the gate arithmetic ``nn.LSTM`` documents: i, f, g, o), so the incremental
path equals the full sequence path (proved in tests): one op per layer instead of the module's
fused kernel, which on the CPU costs ~100 us per call whatever the batch. Normalization lives in
buffers so an artifact carries it.

Usage::

    model = LSTMModel(ModelConfig(input_size=8, hidden_size=64, num_layers=2), spec)
    y, h, c = model.step(x, h, c)              # x: [B, F]; h, c: [L, B, H]
    preds = model.to_prediction(y)             # serving units: value, or class probabilities
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, model_validator
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from streamer.errors import ConfigError
from streamer.features import FeatureSpec

Task = Literal["regression", "classification"]
CLASSES: tuple[str, ...] = ("down", "flat", "up")
# Up to this many rows, a one-event-per-row inference batch runs through ``step`` (cells) rather
# than the fused kernel: measured on the 2-core CPU (H=64, L=2), cells take 75 us at 1 row vs
# 225 us, and the two meet near 512 rows (benchmarks/bench_engine.py).
CELL_ROWS = 512


class ModelConfig(BaseModel):
    """Everything needed to rebuild the network; stored in every artifact's metadata."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    input_size: int
    hidden_size: int = 64
    num_layers: int = 2
    dropout: float = 0.0
    task: Task = "regression"
    flat_band: float = 0.0  # classification: |next - last| <= band counts as "flat"

    @model_validator(mode="after")
    def _positive(self) -> ModelConfig:
        if min(self.input_size, self.hidden_size, self.num_layers) < 1:
            raise ValueError("input_size, hidden_size and num_layers must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("dropout must be in [0, 1)")
        return self

    @property
    def output_size(self) -> int:
        return len(CLASSES) if self.task == "classification" else 1


class LSTMModel(nn.Module):
    x_mean: torch.Tensor  # [F] buffers: normalization travels with the weights
    x_std: torch.Tensor
    y_mean: torch.Tensor  # [] the target's stats, to answer in its own units
    y_std: torch.Tensor

    def __init__(self, config: ModelConfig, spec: FeatureSpec) -> None:
        super().__init__()
        if spec.n_inputs != config.input_size:
            raise ValueError(f"spec has {spec.n_inputs} input features, model {config.input_size}")
        self.config = config
        self.spec = spec
        # Dropout applies between stacked layers during training only (eval() disables it).
        dropout = config.dropout if config.num_layers > 1 else 0.0
        self.lstm = nn.LSTM(
            config.input_size, config.hidden_size, config.num_layers,
            batch_first=True, dropout=dropout,
        )
        self.head = nn.Linear(config.hidden_size, config.output_size)
        self.register_buffer("x_mean", torch.tensor(spec.mean, dtype=torch.float32))
        self.register_buffer("x_std", torch.tensor(spec.std, dtype=torch.float32))
        y_mean, y_std = spec.target_norm
        self.register_buffer("y_mean", torch.tensor(y_mean, dtype=torch.float32))
        self.register_buffer("y_std", torch.tensor(y_std, dtype=torch.float32))

    def zero_state(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (self.config.num_layers, batch, self.config.hidden_size)
        dev = self.x_mean.device
        return torch.zeros(shape, device=dev), torch.zeros(shape, device=dev)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.x_mean) / self.x_std

    def forward(
        self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Full sequences of equal length. x: [B, T, F] -> head output [B, T, out], (h, c)."""
        out, (h, c) = self.lstm(self.normalize(x), state)
        return self.head(out), (h, c)

    def forward_padded(
        self,
        x: torch.Tensor,  # [B, T, F], row b valid for its first lengths[b] steps
        lengths: torch.Tensor,  # [B] int64 on the CPU, every entry >= 1
        h: torch.Tensor,  # [L, B, H]
        c: torch.Tensor,  # [L, B, H]
        enforce_sorted: bool = False,  # True: rows already sorted by length, longest first
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Variable-length sequences in one call; h, c come back at each row's own last step."""
        if x.shape[1] == 1 and x.shape[0] <= CELL_ROWS and not torch.is_grad_enabled():
            y, h_n, c_n = self.step(x[:, 0], h, c)  # one event per row: the cheap small path
            return y.unsqueeze(1), h_n, c_n
        if int(lengths.min()) == x.shape[1]:
            # Every row is full (e.g. each key once in a batch, or full re-warm windows): the
            # dense kernel is several times faster than the packed one on the CPU.
            out, (h_n, c_n) = self.lstm(self.normalize(x), (h, c))
            return self.head(out), h_n, c_n
        packed = pack_padded_sequence(
            self.normalize(x), lengths, batch_first=True, enforce_sorted=enforce_sorted
        )
        out, (h_n, c_n) = self.lstm(packed, (h, c))
        padded, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        return self.head(padded), h_n, c_n

    def step(
        self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One event for each of B keys. x: [B, F]; h, c: [L, B, H] -> y [B, out], h, c.

        The stacked cell of ``self.lstm`` layer by layer (``torch.lstm_cell``, its weights and
        gate order; eval mode: no dropout between layers), then the head. No host sync and
        every shape fixed by B, so a CUDA graph can capture it (``streamer.graphs``)."""
        inp = self.normalize(x)
        hs, cs = [], []
        for layer, (w_ih, w_hh, b_ih, b_hh) in enumerate(self.lstm.all_weights):
            inp, c_l = torch.lstm_cell(inp, (h[layer], c[layer]), w_ih, w_hh, b_ih, b_hh)
            hs.append(inp)
            cs.append(c_l)
        return self.head(inp), torch.stack(hs), torch.stack(cs)

    def to_prediction(self, y: torch.Tensor) -> torch.Tensor:
        """Head output to the model-space target (for a spec without per-key normalization and
        a level target, the target's next value), or P(down, flat, up); see
        :func:`streamer.features.to_value` for the step to the target's units."""
        if self.config.task == "classification":
            return torch.softmax(y, dim=-1)
        return y * self.y_std + self.y_mean


def resolve_device(name: str) -> torch.device:
    """The torch device for a setting: ``auto`` (cuda when torch sees one, else cpu), ``cpu``,
    ``cuda`` or ``cuda:N``. Raises ConfigError (field ``device``) for a CUDA device torch
    cannot see. Shared by the streamer and the trainer."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError("device", f"not a torch device: {name!r}") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device", "cuda was asked for but torch sees no CUDA device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError("device", f"{name} asked for but torch sees "
                              f"{torch.cuda.device_count()} CUDA device(s)")
    return device

"""Feature code shared by the streamer and the trainer, so that serving never skews from training.

An event is first decoded to a *raw* vector (``raw_width`` floats); features are a function of
the raw vector, the event time, and the same key's previous raw vector and time. That previous
observation is the only per-key memory features need, and it is part of the key's state.

Raw layouts (float64):
    generic  values[0..F)                         -> features = values
    sensor   readings in ``spec.names`` order      -> features = readings
    tick     [price, size, bid, ask] (NaN = absent) -> [log_return, log_size, rel_spread, dt]

Usage::

    x = compute_features(spec, raw, ts, prev_raw, prev_ts, has_prev)   # [N, F] float32
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, model_validator

EventKind = Literal["generic", "tick", "sensor"]

TICK_FEATURES: tuple[str, ...] = ("log_return", "log_size", "rel_spread", "dt")
TICK_RAW_WIDTH = 4  # price, size, bid, ask


class FeatureSpec(BaseModel):
    """What the model reads: the event kind, feature names in input order, normalization stats
    (fitted on training data only) and the feature whose *next* value is the regression target."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: EventKind
    names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    target: str

    @model_validator(mode="after")
    def _consistent(self) -> FeatureSpec:
        n = len(self.names)
        if n == 0:
            raise ValueError("a feature spec needs at least one feature")
        if len(set(self.names)) != n:
            raise ValueError(f"duplicate feature names in {self.names}")
        if len(self.mean) != n or len(self.std) != n:
            raise ValueError(f"mean/std need {n} entries, got {len(self.mean)}/{len(self.std)}")
        if any(not (s > 0) for s in self.std):
            raise ValueError("every std must be > 0")
        if self.kind == "tick" and self.names != TICK_FEATURES:
            raise ValueError(f"tick features are fixed: {TICK_FEATURES}")
        if self.target not in self.names:
            raise ValueError(f"target {self.target!r} is not one of the features {self.names}")
        return self

    @property
    def n_features(self) -> int:
        return len(self.names)

    @property
    def raw_width(self) -> int:
        return TICK_RAW_WIDTH if self.kind == "tick" else len(self.names)

    @property
    def target_index(self) -> int:
        return self.names.index(self.target)

    def with_stats(self, mean: list[float], std: list[float]) -> FeatureSpec:
        """A copy carrying new normalization stats (the trainer fits them on its train split)."""
        return FeatureSpec(**{**self.model_dump(), "mean": tuple(mean), "std": tuple(std)})


def default_spec(
    kind: EventKind,
    n_features: int = 8,
    readings: tuple[str, ...] = ("temp", "vibration", "pressure"),
    target: str | None = None,
) -> FeatureSpec:
    """An identity-normalized spec for ``kind``: what `trainer init` writes before any training."""
    if kind == "tick":
        names = TICK_FEATURES
    elif kind == "sensor":
        names = tuple(readings)
    else:
        names = tuple(f"v{i}" for i in range(n_features))
    return FeatureSpec(
        kind=kind,
        names=names,
        mean=(0.0,) * len(names),
        std=(1.0,) * len(names),
        target=target or names[0],
    )


def compute_features(
    spec: FeatureSpec,
    raw: torch.Tensor,  # [N, R] float64
    ts: torch.Tensor,  # [N] float64 epoch seconds
    prev_raw: torch.Tensor,  # [N, R] float64, the same key's previous raw vector
    prev_ts: torch.Tensor,  # [N] float64
    has_prev: torch.Tensor,  # [N] bool, False for a key's first event (or after eviction)
) -> torch.Tensor:  # [N, F] float32, un-normalized (the model normalizes)
    if spec.kind != "tick":
        return raw.to(torch.float32)
    price, size, bid, ask = raw.unbind(-1)
    prev_price = prev_raw[..., 0]
    zero = torch.zeros_like(price)
    log_return = torch.where(has_prev, torch.log(price / prev_price), zero)
    log_size = torch.log1p(size)
    mid = (bid + ask) / 2
    spread_ok = torch.isfinite(bid) & torch.isfinite(ask) & (mid > 0)
    rel_spread = torch.where(spread_ok, (ask - bid) / torch.where(spread_ok, mid, 1.0), zero)
    dt = torch.where(has_prev, ts - prev_ts, zero)
    return torch.stack([log_return, log_size, rel_spread, dt], dim=-1).to(torch.float32)


def sequence_features(spec: FeatureSpec, raw: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
    """Features of one key's whole history in time order (the trainer's and tests' entry point).

    raw: [T, R] float64, ts: [T] float64 -> [T, F] float32. The first event has no previous one.
    """
    prev_raw = torch.cat([raw[:1], raw[:-1]], dim=0)
    prev_ts = torch.cat([ts[:1], ts[:-1]], dim=0)
    has_prev = torch.ones(raw.shape[0], dtype=torch.bool, device=raw.device)
    has_prev[:1] = False
    return compute_features(spec, raw, ts, prev_raw, prev_ts, has_prev)

"""Feature code shared by the streamer and the trainer, so that serving never skews from training.

An event is first decoded to a *raw* vector (``raw_width`` floats); features are a function of
the raw vector, the event time, and the same key's previous raw vector and time. That previous
observation is the only per-key memory features need, and it is part of the key's state.

Raw layouts (float64):
    generic  values[0..F)                         -> features = values (+ extras)
    sensor   readings in ``spec.names`` order      -> features = readings (+ extras)
    tick     [price, size, bid, ask] (NaN = absent) -> [log_return, log_size, rel_spread, dt]

Extras (generic and sensor, ``spec.extras``): ``diff`` each value's change since the key's
previous event; ``dt`` log1p of the seconds since it; ``hour`` and ``dow`` the sine and cosine
of the UTC hour of day and day of week of the event time.

Per-key reversible normalization (``spec.half_life`` events, generic and sensor): each key
keeps, per value, an exponentially weighted mean and variance of the level and an EW mean
square of its change (:class:`KeyStats`, part of the key's state). Levels enter the model as
``(x - mean) / scale``, changes as ``change / change_scale``, and the model's output is
de-normalized with the same statistics, the idea of RevIN (Kim et al., ICLR 2022) and of
DeepAR's per-series scaling (Salinas et al., 2019), done incrementally. The weight of an event is
``max(alpha, 1 / n)`` (n: events seen, alpha = 1 - 2^(-1/half_life)), so the first events give
the plain running mean and variance (the warm start) and later ones the EW statistics.

Target kinds (``spec.target_kind``, generic and sensor): the model predicts the next ``level``,
the next ``change`` or the next ``log_return`` of the target value; a prediction is always given
back as the next value in the target's own units (:func:`to_value`).

Out-of-order events: a key's events are processed in arrival (offset) order by the streamer and
in record order by the trainer; a time delta that would be negative is clamped to 0.

Usage::

    x = compute_features(spec, raw, ts, prev_raw, prev_ts, has_prev)   # [N, F] float64
    z, loc, scale, stats = normalize_steps(spec, x, raw, has_prev, stats0, valid)
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, model_validator

EventKind = Literal["generic", "tick", "sensor"]
TargetKind = Literal["level", "change", "log_return"]
Extra = Literal["diff", "dt", "hour", "dow"]

TICK_FEATURES: tuple[str, ...] = ("log_return", "log_size", "rel_spread", "dt")
TICK_RAW_WIDTH = 4  # price, size, bid, ask
EXTRAS: tuple[str, ...] = ("diff", "dt", "hour", "dow")
Z_CLIP = 10.0  # a per-key normalized input is clipped to +-Z_CLIP (a jump on a calm key)
_DAY_S, _WEEK_S = 86400.0, 7 * 86400.0
_MONDAY = 4 * 86400.0  # the epoch was a Thursday: day-of-week phase 0 is Monday 00:00 UTC
STAT_SLOTS = 3  # per value: EW mean of the level, EW variance of the level, EW mean square change


class FeatureSpec(BaseModel):
    """What the model reads: the event kind, value names in raw order, extra features,
    global normalization stats of the model inputs (fitted on training data only), the value
    whose next observation is the target and how it is expressed (``target_kind``), and the
    half-life in events of the per-key normalization (None: off)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: EventKind
    names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    target: str
    target_kind: TargetKind = "level"
    extras: tuple[Extra, ...] = ()
    half_life: float | None = None
    target_stats: tuple[float, float] | None = None  # (mean, std) of the model-space target

    @model_validator(mode="after")
    def _consistent(self) -> FeatureSpec:
        n = len(self.names)
        if n == 0:
            raise ValueError("a feature spec needs at least one feature")
        if len(set(self.names)) != n:
            raise ValueError(f"duplicate feature names in {self.names}")
        m = self.n_inputs
        if len(self.mean) != m or len(self.std) != m:
            raise ValueError(f"mean/std need {m} entries, got {len(self.mean)}/{len(self.std)}")
        if any(not (s > 0) for s in self.std):
            raise ValueError("every std must be > 0")
        if self.kind == "tick" and self.names != TICK_FEATURES:
            raise ValueError(f"tick features are fixed: {TICK_FEATURES}")
        if self.kind == "tick" and (self.extras or self.half_life is not None
                                    or self.target_kind != "level"):
            raise ValueError("tick features are fixed: no extras, half_life or target_kind")
        if len(set(self.extras)) != len(self.extras):
            raise ValueError(f"duplicate extras in {self.extras}")
        if self.half_life is not None and not self.half_life > 0:
            raise ValueError("half_life must be > 0 events")
        if self.target_stats is not None and not self.target_stats[1] > 0:
            raise ValueError("the target's std must be > 0")
        if self.target not in self.names:
            raise ValueError(f"target {self.target!r} is not one of the features {self.names}")
        return self

    @property
    def n_features(self) -> int:
        """Values per event (generic values, sensor readings; 4 tick features)."""
        return len(self.names)

    @property
    def input_names(self) -> tuple[str, ...]:
        """The model's input columns: the values, then the extras in ``EXTRAS`` order."""
        return input_names_of(self.names, self.extras)

    @property
    def n_inputs(self) -> int:
        return len(self.input_names)

    @property
    def raw_width(self) -> int:
        return TICK_RAW_WIDTH if self.kind == "tick" else len(self.names)

    @property
    def stat_width(self) -> int:
        """Values with per-key statistics (0 for ticks, whose features are scale-free)."""
        return 0 if self.kind == "tick" else len(self.names)

    @property
    def target_index(self) -> int:
        return self.names.index(self.target)

    @property
    def target_raw_column(self) -> int | None:
        """Raw column of the target value, or None when the target is a derived feature."""
        return None if self.kind == "tick" else self.target_index

    @property
    def target_norm(self) -> tuple[float, float]:
        """(mean, std) that turn the model's head output into the model-space target."""
        if self.target_stats is not None:
            return self.target_stats
        return self.mean[self.target_index], self.std[self.target_index]

    def with_stats(
        self, mean: list[float], std: list[float], target: tuple[float, float] | None = None
    ) -> FeatureSpec:
        """A copy carrying new normalization stats (the trainer fits them on its train split)."""
        return FeatureSpec(**{**self.model_dump(), "mean": tuple(mean), "std": tuple(std),
                              "target_stats": target if target else self.target_stats})


def input_names_of(names: tuple[str, ...], extras: tuple[str, ...]) -> tuple[str, ...]:
    out = list(names)
    if "diff" in extras:
        out += [f"{n}_diff" for n in names]
    if "dt" in extras:
        out.append("dt")
    for cycle in ("hour", "dow"):
        if cycle in extras:
            out += [f"{cycle}_sin", f"{cycle}_cos"]
    return tuple(out)


def default_spec(
    kind: EventKind,
    n_features: int = 8,
    readings: tuple[str, ...] = ("temp", "vibration", "pressure"),
    target: str | None = None,
    target_kind: TargetKind = "level",
    extras: tuple[Extra, ...] = (),
    half_life: float | None = None,
) -> FeatureSpec:
    """An identity-normalized spec for ``kind``: what `trainer init` writes before any training."""
    if kind == "tick":
        names = TICK_FEATURES
    elif kind == "sensor":
        names = tuple(readings)
    else:
        names = tuple(f"v{i}" for i in range(n_features))
    ordered = tuple(e for e in EXTRAS if e in extras)
    n = len(input_names_of(names, ordered))
    return FeatureSpec(
        kind=kind, names=names, mean=(0.0,) * n, std=(1.0,) * n, target=target or names[0],
        target_kind=target_kind, extras=ordered, half_life=half_life,  # type: ignore[arg-type]
    )


def compute_features(
    spec: FeatureSpec,
    raw: torch.Tensor,  # [N, R] float64
    ts: torch.Tensor,  # [N] float64 epoch seconds
    prev_raw: torch.Tensor,  # [N, R] float64, the same key's previous raw vector
    prev_ts: torch.Tensor,  # [N] float64
    has_prev: torch.Tensor,  # [N] bool, False for a key's first event (or after eviction)
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:  # [N, n_inputs], before any normalization
    """Features of events given each one's previous event of the same key (any leading dims).

    A time delta is clamped at 0: an event older than its key's previous one (out of order)
    counts as simultaneous."""
    zero = torch.zeros_like(ts)
    dt = torch.where(has_prev, torch.clamp(ts - prev_ts, min=0.0), zero)
    if spec.kind != "tick":
        cols = [raw]
        if "diff" in spec.extras:
            cols.append(torch.where(has_prev.unsqueeze(-1), raw - prev_raw, 0.0))
        if "dt" in spec.extras:
            cols.append(torch.log1p(dt).unsqueeze(-1))
        for cycle, period, phase in (("hour", _DAY_S, 0.0), ("dow", _WEEK_S, _MONDAY)):
            if cycle in spec.extras:
                angle = torch.remainder(ts - phase, period) * (2 * math.pi / period)
                cols.append(torch.stack([torch.sin(angle), torch.cos(angle)], dim=-1))
        return torch.cat(cols, dim=-1).to(dtype)
    price, size, bid, ask = raw.unbind(-1)
    prev_price = prev_raw[..., 0]
    log_return = torch.where(has_prev, torch.log(price / prev_price), zero)
    log_size = torch.log1p(size)
    mid = (bid + ask) / 2
    spread_ok = torch.isfinite(bid) & torch.isfinite(ask) & (mid > 0)
    rel_spread = torch.where(spread_ok, (ask - bid) / torch.where(spread_ok, mid, 1.0), zero)
    return torch.stack([log_return, log_size, rel_spread, dt], dim=-1).to(dtype)


def previous(raw: torch.Tensor, ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(prev_raw, prev_ts, has_prev) of one key's sequence: raw [T, R], ts [T]."""
    prev_raw = torch.cat([raw[:1], raw[:-1]], dim=0)
    prev_ts = torch.cat([ts[:1], ts[:-1]], dim=0)
    has_prev = torch.ones(raw.shape[0], dtype=torch.bool, device=raw.device)
    has_prev[:1] = False
    return prev_raw, prev_ts, has_prev


def sequence_features(spec: FeatureSpec, raw: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
    """Features of one key's whole history in arrival order (the trainer's and tests' entry).

    raw: [T, R] float64, ts: [T] float64 -> [T, F] float32. The first event has no previous one.
    """
    prev_raw, prev_ts, has_prev = previous(raw, ts)
    return compute_features(spec, raw, ts, prev_raw, prev_ts, has_prev)


def sequence_inputs(
    spec: FeatureSpec, raw: torch.Tensor, ts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Model inputs of keys' whole histories, each from a fresh state (the trainer's and the
    tests' entry point). raw: [K, T, R] float64, ts: [K, T] float64, every row full length
    (or [T, R], [T] for one key) -> z [.., T, n_inputs] float32, loc and scale [.., T]."""
    one = raw.dim() == 2
    if one:
        raw, ts = raw.unsqueeze(0), ts.unsqueeze(0)
    prev_raw = torch.cat([raw[:, :1], raw[:, :-1]], dim=1)
    prev_ts = torch.cat([ts[:, :1], ts[:, :-1]], dim=1)
    has_prev = torch.ones(ts.shape, dtype=torch.bool, device=raw.device)
    has_prev[:, :1] = False
    feats = compute_features(spec, raw, ts, prev_raw, prev_ts, has_prev, torch.float64)
    k = raw.shape[0]
    stats = raw.new_zeros(k, spec.stat_width, STAT_SLOTS)
    valid = torch.ones(ts.shape, dtype=torch.bool, device=raw.device)
    z, loc, scale, _, _ = normalize_steps(spec, feats, raw, prev_raw, has_prev, stats,
                                          raw.new_zeros(k), valid)
    return (z[0], loc[0], scale[0]) if one else (z, loc, scale)


# --- per-key reversible normalization ---------------------------------------------------------


def _floor(mean: torch.Tensor) -> torch.Tensor:
    # A constant value has no spread: keep the scale a tiny fraction of its magnitude.
    return 1e-6 * (mean.abs() + 1.0)


def normalize_steps(
    spec: FeatureSpec,
    x: torch.Tensor,  # [U, T, n_inputs] float64 features (compute_features)
    raw: torch.Tensor,  # [U, T, R] float64
    prev_raw: torch.Tensor,  # [U, T, R] float64
    has_prev: torch.Tensor,  # [U, T] bool
    stats: torch.Tensor,  # [U, C, 3] float64: each row's key statistics before step 0
    count: torch.Tensor,  # [U] float64: events the key has seen before step 0
    valid: torch.Tensor,  # [U, T] bool: False on padding (padding never updates statistics)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-key normalized model inputs and the target's location and scale at every step.

    Returns z [U, T, n_inputs] float32, loc [U, T] and scale [U, T] float64 (the model-space
    target is ``(next - loc) / scale`` for a level, ``change / scale`` for a change, ``log
    return / scale`` for a log return), and the statistics and counts after each row's last
    valid step. Step t is normalized with statistics that include event t (never a later one).
    Without ``spec.half_life`` the inputs pass through and loc, scale are 0, 1.
    """
    u, t_len = x.shape[0], x.shape[1]
    if spec.half_life is None or spec.stat_width == 0:
        zeros = x.new_zeros(u, t_len)
        return x.to(torch.float32), zeros, zeros + 1.0, stats, count
    c, ti = spec.stat_width, spec.target_index
    alpha = 1.0 - 2.0 ** (-1.0 / spec.half_life)
    m, var, sq = stats[..., 0].clone(), stats[..., 1].clone(), stats[..., 2].clone()
    n = count.clone()
    z = x.clone()
    loc = x.new_zeros(u, t_len)
    scale = x.new_ones(u, t_len)
    has_diff = "diff" in spec.extras
    for t in range(t_len):
        ok = valid[:, t]
        v = raw[:, t, :c]
        d = torch.where(has_prev[:, t, None], v - prev_raw[:, t, :c], 0.0)
        n_new = n + ok.to(n.dtype)
        a = torch.clamp(1.0 / n_new.clamp(min=1.0), min=alpha).unsqueeze(-1)
        delta = v - m
        okc = ok.unsqueeze(-1)
        m = torch.where(okc, m + a * delta, m)
        var = torch.where(okc, (1 - a) * (var + a * delta * delta), var)
        ad = torch.clamp(1.0 / (n_new - 1.0).clamp(min=1.0), min=alpha).unsqueeze(-1)
        moved = okc & has_prev[:, t, None]
        sq = torch.where(moved, sq + ad * (d * d - sq), sq)
        n = n_new
        floor = _floor(m)
        s_level = torch.maximum(var.sqrt(), floor)
        s_diff = torch.maximum(sq.sqrt(), floor)
        z[:, t, :c] = torch.clamp((v - m) / s_level, -Z_CLIP, Z_CLIP)
        if has_diff:
            z[:, t, c:2 * c] = torch.clamp(d / s_diff, -Z_CLIP, Z_CLIP)
        if spec.target_kind == "level":
            loc[:, t], scale[:, t] = m[:, ti], s_level[:, ti]
        elif spec.target_kind == "change":
            scale[:, t] = s_diff[:, ti]
        else:
            scale[:, t] = s_diff[:, ti] / torch.clamp(m[:, ti].abs(), min=1e-12)
    out = torch.stack([m, var, sq], dim=-1)
    return z.to(torch.float32), loc, scale, out, n


def model_target(
    spec: FeatureSpec, nxt: torch.Tensor, last: torch.Tensor, loc: torch.Tensor,
    scale: torch.Tensor,
) -> torch.Tensor:
    """The model-space target of a step: the next value expressed per ``spec.target_kind``
    and scaled by the key's statistics (the inverse of :func:`to_value`)."""
    if spec.target_kind == "change":
        return (nxt - last) / scale
    if spec.target_kind == "log_return":
        return torch.log(nxt / last) / scale
    return (nxt - loc) / scale


def to_value(
    spec: FeatureSpec, out: torch.Tensor, last: torch.Tensor, loc: torch.Tensor,
    scale: torch.Tensor,
) -> torch.Tensor:
    """Model-space output [...] to the predicted next value in the target's units."""
    if spec.target_kind == "change":
        return last + scale * out
    if spec.target_kind == "log_return":
        return last * torch.exp(scale * out)
    return loc + scale * out

"""Per-key reversible normalization, change and calendar features, and target kinds: the
vectorized code in ``streamer.features`` against a slow per-event reference written with plain
floats, and the round trip between a target's units and the model's."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from streamer.features import (
    STAT_SLOTS,
    Z_CLIP,
    compute_features,
    default_spec,
    model_target,
    previous,
    sequence_inputs,
    to_value,
)


def _slow_stats(values: list[list[float]], half_life: float) -> list[tuple[list[float], ...]]:
    """Per event, after it: (EW mean, EW variance, EW mean square change) of every value, by
    the textbook recursions with weight max(alpha, 1/n), one event at a time."""
    alpha = 1.0 - 2.0 ** (-1.0 / half_life)
    c = len(values[0])
    m, var, sq = [0.0] * c, [0.0] * c, [0.0] * c
    out = []
    for n, row in enumerate(values, start=1):
        a = max(alpha, 1.0 / n)
        for j, x in enumerate(row):
            delta = x - m[j]
            m[j] += a * delta
            var[j] = (1 - a) * (var[j] + a * delta * delta)
            if n > 1:
                ad = max(alpha, 1.0 / (n - 1))
                d = x - values[n - 2][j]
                sq[j] += ad * (d * d - sq[j])
        out.append((list(m), list(var), list(sq)))
    return out


@pytest.mark.parametrize("half_life", [1.0, 5.0, 50.0])
def test_per_key_statistics_equal_a_slow_per_event_reference(half_life: float) -> None:
    rng = np.random.default_rng(0)
    values = (100 + np.cumsum(rng.normal(size=(60, 3)), axis=0)).tolist()
    spec = default_spec("generic", n_features=3, extras=("diff",), half_life=half_life,
                        target_kind="change", target="v1")
    raw = torch.tensor(values, dtype=torch.float64)
    ts = torch.arange(60, dtype=torch.float64)
    z, loc, scale = sequence_inputs(spec, raw, ts)
    slow = _slow_stats(values, half_life)
    for t, (m, var, sq) in enumerate(slow):
        for j in range(3):
            floor = 1e-6 * (abs(m[j]) + 1.0)
            s_level = max(math.sqrt(var[j]), floor)
            s_diff = max(math.sqrt(sq[j]), floor)
            level = min(max((values[t][j] - m[j]) / s_level, -Z_CLIP), Z_CLIP)
            change = values[t][j] - values[t - 1][j] if t else 0.0
            diff = min(max(change / s_diff, -Z_CLIP), Z_CLIP)
            assert z[t, j].item() == pytest.approx(level, rel=1e-5, abs=1e-5)
            assert z[t, 3 + j].item() == pytest.approx(diff, rel=1e-5, abs=1e-5)
            if j == 1:  # the target: a change, scaled by the change's EW RMS
                assert loc[t].item() == 0.0
                assert scale[t].item() == pytest.approx(s_diff, rel=1e-12)


def test_statistics_carried_across_calls_equal_one_call() -> None:
    """What the streamer does (batches, the state in between) equals the whole sequence."""
    from streamer.features import normalize_steps

    rng = np.random.default_rng(1)
    spec = default_spec("sensor", readings=("a", "b"), extras=("diff", "dt", "hour"),
                        half_life=7.0, target_kind="level")
    raw = torch.tensor(rng.normal(20, 3, size=(40, 2)), dtype=torch.float64)
    ts = 1.7e9 + torch.cumsum(torch.tensor(rng.exponential(60, 40)), 0)
    whole, loc_w, scale_w = sequence_inputs(spec, raw, ts)
    prev_raw, prev_ts, has_prev = previous(raw, ts)
    feats = compute_features(spec, raw, ts, prev_raw, prev_ts, has_prev, torch.float64)
    stats = torch.zeros(1, 2, STAT_SLOTS, dtype=torch.float64)
    count = torch.zeros(1, dtype=torch.float64)
    parts = []
    for lo, hi in ((0, 1), (1, 13), (13, 40)):
        z, loc, scale, stats, count = normalize_steps(
            spec, feats[None, lo:hi], raw[None, lo:hi], prev_raw[None, lo:hi],
            has_prev[None, lo:hi], stats, count, torch.ones(1, hi - lo, dtype=torch.bool))
        parts.append((z[0], loc[0], scale[0]))
    assert_close(torch.cat([p[0] for p in parts]), whole, rtol=0, atol=0)
    assert_close(torch.cat([p[1] for p in parts]), loc_w, rtol=0, atol=0)
    assert_close(torch.cat([p[2] for p in parts]), scale_w, rtol=0, atol=0)
    assert count.item() == 40


def test_calendar_and_time_features_by_hand() -> None:
    spec = default_spec("generic", n_features=1, extras=("dt", "hour", "dow"))
    assert spec.input_names == ("v0", "dt", "hour_sin", "hour_cos", "dow_sin", "dow_cos")
    monday_6am = 1736143200.0  # 2025-01-06T06:00:00Z
    raw = torch.tensor([[1.0], [2.0], [3.0]], dtype=torch.float64)
    ts = torch.tensor([monday_6am, monday_6am + 3600, monday_6am + 1800], dtype=torch.float64)
    prev_raw, prev_ts, has_prev = previous(raw, ts)
    x = compute_features(spec, raw, ts, prev_raw, prev_ts, has_prev, torch.float64)
    assert x[0, 1] == 0.0 and x[1, 1].item() == pytest.approx(math.log1p(3600))
    assert x[2, 1] == 0.0  # out of order: the negative delta is clamped to 0
    assert x[0, 2].item() == pytest.approx(1.0) and x[0, 3].item() == pytest.approx(0.0, abs=1e-9)
    angle = 2 * math.pi * (6 / 24) / 7  # Monday 06:00 is a quarter day into the week
    assert x[0, 4].item() == pytest.approx(math.sin(angle))
    assert x[0, 5].item() == pytest.approx(math.cos(angle))


@pytest.mark.parametrize("kind", ["level", "change", "log_return"])
def test_target_kinds_round_trip(kind: str) -> None:
    spec = default_spec("generic", n_features=1, target_kind=kind, half_life=10.0)  # type: ignore[arg-type]
    last = torch.tensor([10.0, 20.0, 5.0], dtype=torch.float64)
    nxt = torch.tensor([11.0, 19.0, 5.0], dtype=torch.float64)
    loc = torch.tensor([9.0, 21.0, 4.0], dtype=torch.float64)
    scale = torch.tensor([0.5, 2.0, 0.1], dtype=torch.float64)
    y = model_target(spec, nxt, last, loc, scale)
    assert_close(to_value(spec, y, last, loc, scale), nxt)
    zero = to_value(spec, torch.zeros(3, dtype=torch.float64), last, loc, scale)
    if kind == "level":
        assert_close(zero, loc)
    else:  # a change target's zero is "no change": persistence
        assert_close(zero, last)

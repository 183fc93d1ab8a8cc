"""Baselines in the target's units, computed from the dataset itself, per key.

Persistence is "no change" (the last value; for a tick's log return, a return of 0). Seasonal
naive repeats the value one season earlier (the season in events, given or detected from the
training part's autocorrelation of changes). The moving average smooths the last values. The
per-key AR(p) is fitted by least squares on the training pairs only, on the differences of a
level series (on the values of a change series such as a tick's log return).

Usage::

    preds = baseline_predictions(data, ar_order=5, ma_window=8, season=detect_season(data))
    preds["persistence"], preds["ar"]          # [K, T] next-value predictions
"""

from __future__ import annotations

from typing import Any

import numpy as np

from trainer.dataset import Dataset, is_change_target

BASELINES = ("persistence", "seasonal_naive", "moving_average", "ar")


# --- baselines ------------------------------------------------------------------------------


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """[K, T]: mean of the last ``window`` values up to and including step t, per key."""
    csum = np.concatenate([np.zeros((values.shape[0], 1)), np.cumsum(values, axis=1)], axis=1)
    t = np.arange(values.shape[1])
    lo = np.maximum(t + 1 - window, 0)
    return (csum[:, t + 1] - csum[:, lo]) / (t + 1 - lo)


def _lags(values: np.ndarray, order: int) -> np.ndarray:
    """[K, T, 1 + order]: intercept, value at t, t-1, ... (zeros before a key's start)."""
    k, t = values.shape
    out = np.zeros((k, t, order + 1))
    out[..., 0] = 1.0
    for j in range(order):
        out[:, j:, j + 1] = values[:, : t - j]
    return out


def _lstsq(design: np.ndarray, target: np.ndarray) -> np.ndarray:
    # A whisper of ridge keeps a near-constant series (a flat sensor) solvable.
    gram = design.T @ design
    gram += 1e-9 * np.trace(gram) / len(gram) * np.eye(len(gram))
    try:
        return np.linalg.solve(gram, design.T @ target)
    except np.linalg.LinAlgError:  # too few or all-zero rows (a very short history): no fit,
        return np.zeros(design.shape[-1])  # so the AR forecast is "no change" (persistence)


def _differences(values: np.ndarray) -> np.ndarray:
    out = np.zeros_like(values)
    out[:, 1:] = values[:, 1:] - values[:, :-1]
    return out


def autoregressive(data: Dataset, order: int) -> np.ndarray:
    """[K, T] next-value predictions of a per-key linear AR(order) fitted on training pairs:
    on the differences of a level series (next = last + predicted change), on the values of a
    change series (a tick's log return).

    A key with too few training pairs uses one AR pooled over every key's training pairs.
    Steps with fewer than ``order`` past values fall back to persistence.
    """
    change = is_change_target(data.spec)
    values = data.last if change else _differences(data.last)
    target = data.next if change else data.next - data.last
    design = _lags(values, order)
    usable = np.arange(values.shape[1])[None, :] >= order - (0 if change else -1) - 1
    fit_rows = data.train & usable
    pooled = _lstsq(design[fit_rows], target[fit_rows])
    pred = values.copy() if change else np.zeros_like(values)
    min_rows = max(4 * (order + 1), 20)
    for i in range(values.shape[0]):
        rows = fit_rows[i]
        coef = _lstsq(design[i, rows], target[i, rows]) if rows.sum() >= min_rows else pooled
        pred[i, usable[0]] = design[i, usable[0]] @ coef
    return pred if change else data.last + pred


def detect_season(data: Dataset, max_lag: int = 400, threshold: float = 0.3) -> int | None:
    """The lag (events) with the highest mean autocorrelation of the training part's changes
    (a tick's returns) over keys, if it exceeds ``threshold``; None when nothing is periodic."""
    series = data.last if is_change_target(data.spec) else _differences(data.last)
    acf_sum: np.ndarray | None = None
    used = 0
    for i in range(series.shape[0]):
        x = series[i, 1:][data.train[i, 1:]]
        lags = min(max_lag, len(x) // 3)
        if lags < 2:
            continue
        x = x - x.mean()
        denom = float(x @ x)
        if denom <= 0:
            continue
        acf = np.array([float(x[:-k] @ x[k:]) / denom for k in range(1, max_lag + 1)
                        if k <= lags] + [0.0] * (max_lag - lags))
        acf_sum = acf if acf_sum is None else acf_sum + acf
        used += 1
    if acf_sum is None:
        return None
    acf = acf_sum / used
    lag = int(np.argmax(acf[1:]) + 2)  # lag 1 is short memory, not a season
    return lag if acf[lag - 1] > threshold else None


def seasonal_naive(data: Dataset, season: int) -> np.ndarray:
    """[K, T]: the next value is the value one season before it (persistence until then)."""
    back = np.arange(data.last.shape[1]) + 1 - season  # the step whose value predicts t+1
    pred = data.last.copy()
    ok = back >= 0
    pred[:, ok] = data.last[:, back[ok]]
    return pred


def baseline_predictions(
    data: Dataset, ar_order: int = 5, ma_window: int = 8, season: int | None = None
) -> dict[str, Any]:
    persistence = np.zeros_like(data.last) if is_change_target(data.spec) else data.last
    out = {"persistence": persistence}
    if season is not None and season > 1:
        out["seasonal_naive"] = seasonal_naive(data, season)
    out["moving_average"] = moving_average(data.last, ma_window)
    out["ar"] = autoregressive(data, ar_order)
    return out

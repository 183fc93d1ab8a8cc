"""Metrics, baselines and the champion/challenger gate."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from streamer.features import default_spec
from streamer.model import LSTMModel, ModelConfig
from trainer.baselines import autoregressive, moving_average
from trainer.data import History, KeySeries, decode_history, read_files, resolve_spec
from trainer.dataset import build_dataset
from trainer.evaluate import (
    classification_metrics,
    evaluate,
    for_metadata,
    gate,
    regression_metrics,
)
from trainer.search import train_model
from trainer.train import TrainOptions


def _ar_history(phis: dict[str, float], n: int = 600, seed: int = 0) -> History:
    """Per key a level whose *changes* follow an AR(1) with that key's phi."""
    rng = np.random.default_rng(seed)
    spec = default_spec("generic", n_features=1)
    series = {}
    for key, phi in phis.items():
        d = np.zeros(n)
        for t in range(1, n):
            d[t] = 0.3 + phi * d[t - 1] + rng.standard_normal()
        series[key] = KeySeries(np.arange(n, dtype=np.float64) + rng.uniform(0, 0.5),
                                (50.0 + np.cumsum(d))[:, None])
    return History(spec, series)


def test_per_key_ar_on_differences_recovers_each_keys_dynamics() -> None:
    data = build_dataset(_ar_history({"a": 0.8, "b": -0.5}), val_fraction=0.3)
    pred = autoregressive(data, order=1)
    last_change = np.diff(data.last, axis=1, prepend=0.0)
    for i, phi in enumerate((0.8, -0.5)):
        mask = data.val[i]
        slope = np.polyfit(last_change[i, mask], (pred - data.last)[i, mask], 1)[0]
        assert slope == pytest.approx(phi, abs=0.08)
    # Fitted on the training pairs only: predictions are the same if validation targets change.
    data.next[data.val] += 100.0
    np.testing.assert_array_equal(autoregressive(data, order=1), pred)


def test_moving_average_and_persistence() -> None:
    values = np.array([[1.0, 2.0, 3.0, 4.0, 10.0]])
    np.testing.assert_allclose(moving_average(values, 3), [[1.0, 1.5, 2.0, 3.0, 17 / 3]])
    report = evaluate(build_dataset(_ar_history({"a": 0.5}, n=200)), {}, ar_order=2, season=0)
    assert set(report["overall"]) == {"persistence", "moving_average", "ar"}
    # Persistence on a level target never calls a direction.
    assert report["overall"]["persistence"]["direction_accuracy"] is None
    assert report["overall"]["ar"]["direction_accuracy"] > 0.6


def test_regression_metrics_by_hand() -> None:
    m = regression_metrics(np.array([1.0, 2.0, 3.0]), np.array([1.0, 3.0, 5.0]),
                           np.array([1.0, -1.0, 0.0]), np.array([1.0, 1.0, 0.0]))
    assert m["mae"] == pytest.approx(1.0)
    assert m["rmse"] == pytest.approx(math.sqrt(5 / 3))
    assert m["direction_accuracy"] == pytest.approx(0.5)  # the zero actual move is not counted
    assert m["n"] == 3


def test_classification_metrics_by_hand() -> None:
    m = classification_metrics(np.array([0, 0, 1, 2, 2]), np.array([0, 1, 1, 2, 0]))
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["macro_f1"] == pytest.approx((1 / 2 + 2 / 3 + 2 / 3) / 3)


def test_tick_persistence_is_no_change_of_the_price(small_tick_file: Path) -> None:
    """For a log-return target, persistence repeats the last *price*: a return of 0. It calls
    no direction, and MASE is measured against it."""
    records = read_files([small_tick_file])
    data = build_dataset(decode_history(records, resolve_spec(records)), test_fraction=0.2)
    report = evaluate(data, {})
    mask = data.test
    persistence = report["overall"]["persistence"]
    assert persistence["mae"] == pytest.approx(np.abs(data.next[mask]).mean())
    assert persistence["direction_accuracy"] is None and persistence["mase"] == 1.0
    ar = report["overall"]["ar"]
    assert ar["mase"] == pytest.approx(ar["mae"] / persistence["mae"])
    assert set(report["per_key"]) == {k for i, k in enumerate(data.keys) if mask[i].any()}


# --- the gate --------------------------------------------------------------------------------


def _report(candidate: float, **others: float | None) -> dict[str, Any]:
    overall = {"candidate": {"mae": candidate}}
    overall.update({name: {"mae": v} for name, v in others.items() if v is not None})
    return {"primary": "mae", "overall": overall, "skipped": {}}


def test_gate_needs_to_beat_production_and_persistence() -> None:
    assert gate(_report(0.8, persistence=1.0, production=0.9), has_production=True).publish
    worse = gate(_report(0.95, persistence=1.0, production=0.9), has_production=True)
    assert not worse.publish and "production" in worse.reasons[0]
    assert not gate(_report(1.1, persistence=1.0)).publish
    assert not gate(_report(1.0, persistence=1.0)).publish  # a tie is not an improvement
    forced = gate(_report(0.95, persistence=1.0, production=0.9), has_production=True, force=True)
    assert forced.publish and forced.forced and forced.reasons


def test_gate_refuses_when_production_cannot_be_compared() -> None:
    report = _report(0.5, persistence=1.0)
    report["skipped"] = {"production": "reads sensor features"}
    decision = gate(report, has_production=True)
    assert not decision.publish and "sensor" in decision.reasons[0]
    assert not gate(_report(0.5, persistence=1.0), extra_problems=["shape"]).publish


def test_gate_on_classification_wants_higher_macro_f1() -> None:
    report = {"primary": "macro_f1", "skipped": {}, "overall": {
        "candidate": {"macro_f1": 0.5}, "persistence": {"macro_f1": 0.2},
        "production": {"macro_f1": 0.45}}}
    assert gate(report, has_production=True).publish
    report["overall"]["production"]["macro_f1"] = 0.6
    assert not gate(report, has_production=True).publish


def test_gate_refuses_a_worse_model_on_real_predictions(small_tick_file: Path) -> None:
    records = read_files([small_tick_file])
    data = build_dataset(decode_history(records, resolve_spec(records)))
    good = train_model(data, TrainOptions(hidden=(8,), layers=1, epochs=3, seq_len=16)).model
    torch.manual_seed(0)
    bad = LSTMModel(good.config, data.spec.with_stats([0.0] * 4, [1e-3] * 4)).eval()
    challenger_wins = evaluate(data, {"candidate": good, "production": bad})
    reasons = gate(challenger_wins, has_production=True).reasons
    assert not any("production" in r for r in reasons), reasons
    champion_holds = evaluate(data, {"candidate": bad, "production": good})
    decision = gate(champion_holds, has_production=True)
    assert not decision.publish
    assert gate(champion_holds, has_production=True, force=True).publish


def test_incomparable_production_is_skipped_with_a_reason(small_tick_file: Path) -> None:
    records = read_files([small_tick_file])
    data = build_dataset(decode_history(records, resolve_spec(records)))
    sensor_spec = default_spec("sensor", readings=("a", "b", "c", "d"))
    other = LSTMModel(ModelConfig(input_size=4, hidden_size=8, num_layers=1), sensor_spec)
    report = evaluate(data, {"candidate": None, "production": other})
    assert "production" not in report["overall"]
    assert "sensor" in report["skipped"]["production"]


def test_metadata_copy_caps_per_key_rows() -> None:
    report = evaluate(build_dataset(_ar_history({f"k{i}": 0.5 for i in range(5)}, n=50)), {})
    capped = for_metadata(report, max_keys=2)
    assert len(capped["per_key"]) == 2 and capped["per_key_truncated"] == 3
    assert len(report["per_key"]) == 5


def test_gate_refuses_a_model_that_loses_to_persistence(tmp_path: Path) -> None:
    """A model that predicts a constant level loses to "no change" on a random walk: refused
    on the test window, with the best baseline named."""
    data = build_dataset(_ar_history({"a": 0.0, "b": 0.0}, n=400), val_fraction=0.2,
                         test_fraction=0.2)
    torch.manual_seed(0)
    spec = data.spec.model_copy(update={"target_kind": "level", "half_life": None,
                                        "target_stats": (50.0, 1.0)})
    flat = LSTMModel(ModelConfig(input_size=spec.n_inputs, hidden_size=4, num_layers=1),
                     spec).eval()
    with torch.no_grad():
        for p in flat.parameters():
            p.zero_()  # output 0 -> always the level 50: no idea where the walk went
    data.spec = spec
    report = evaluate(data, {"candidate": flat}, season=0)
    assert report["window"] == "test"
    overall = report["overall"]
    assert overall["candidate"]["mae"] > overall["persistence"]["mae"]
    decision = gate(report)
    assert not decision.publish
    assert "does not beat" in decision.reasons[0]

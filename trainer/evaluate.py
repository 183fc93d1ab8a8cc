"""Evaluation on the test window, against baselines computed right here, and the gate.

Why baselines in every report: an LSTM's error means little alone. Persistence (no change:
next = last value; for a tick's log return, a return of 0), seasonal naive (the value one
season ago, ``season`` events, detected from the training part when not given), a moving
average and a per-key linear AR(p) on differences fitted on the training part are the bars a
model must clear; the gate publishes a candidate only if it beats the current model *and* the
best baseline on the same test events (champion/challenger). MASE is the MAE divided by the
persistence MAE on the same events.

Direction: a prediction's move is ``pred - last`` (for a change target such as a tick's log
return, the prediction itself); direction accuracy counts sign agreement over events whose
actual move is not zero, and is None for a predictor that never calls a direction
(persistence on a level). Classification: accuracy and macro-F1 of down/flat/up, where value
predictors (the baselines) are turned into classes with the same flat band.

Usage::

    report = evaluate(data, {"candidate": model, "production": current})
    render(report, console)
    decision = gate(report, force=False)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from streamer.model import LSTMModel, Task
from trainer.baselines import BASELINES, baseline_predictions, detect_season
from trainer.dataset import Dataset, is_change_target, move_classes, predict

__all__ = ["BASELINES", "evaluate", "gate", "render", "for_metadata"]


# --- metrics --------------------------------------------------------------------------------


def _clean(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def regression_metrics(pred: np.ndarray, actual: np.ndarray, pred_move: np.ndarray,
                       actual_move: np.ndarray) -> dict[str, Any]:
    err = pred - actual
    moving = actual_move != 0
    called = bool(np.any(pred_move != 0))
    direction = None
    if called and moving.any():
        direction = float(np.mean(np.sign(pred_move[moving]) == np.sign(actual_move[moving])))
    return {
        "mae": _clean(float(np.abs(err).mean())) if err.size else None,
        "rmse": _clean(float(np.sqrt(np.mean(err**2)))) if err.size else None,
        "direction_accuracy": direction,
        "n": int(err.size),
    }


def classification_metrics(pred: np.ndarray, labels: np.ndarray, n_classes: int = 3
                           ) -> dict[str, Any]:
    """Accuracy and macro-F1 (mean F1 over the classes present in truth or prediction)."""
    if labels.size == 0:
        return {"accuracy": None, "macro_f1": None, "n": 0}
    f1s = []
    for c in range(n_classes):
        tp = int(np.sum((pred == c) & (labels == c)))
        fp = int(np.sum((pred == c) & (labels != c)))
        fn = int(np.sum((pred != c) & (labels == c)))
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return {
        "accuracy": float(np.mean(pred == labels)),
        "macro_f1": float(np.mean(f1s)),
        "n": int(labels.size),
    }


# --- the report -----------------------------------------------------------------------------


def incompatibility(model: LSTMModel, data: Dataset, task: Task, flat_band: float) -> str | None:
    """Why ``model`` cannot be scored on ``data`` against the candidate, or None."""
    spec = model.spec
    if (spec.kind, spec.names, spec.target) != (data.spec.kind, data.spec.names, data.spec.target):
        return (f"reads {spec.kind} features {list(spec.names)} -> {spec.target}, the data is "
                f"{data.spec.kind} {list(data.spec.names)} -> {data.spec.target}")
    mine = (spec.extras, spec.half_life, spec.target_kind)
    theirs = (data.spec.extras, data.spec.half_life, data.spec.target_kind)
    if mine != theirs:
        return f"extras, half-life, target kind {mine}, the candidate's are {theirs}"
    if model.config.task != task:
        return f"task {model.config.task}, the candidate's is {task}"
    if task == "classification" and model.config.flat_band != flat_band:
        return f"flat band {model.config.flat_band}, the candidate's is {flat_band}"
    return None


@dataclass
class _Predictor:
    """One predictor's arrays, computed once and then sliced overall and per key."""

    name: str
    values: np.ndarray | None = None  # [K, T] next-value predictions (regression)
    move: np.ndarray | None = None  # [K, T] predicted move
    classes: np.ndarray | None = None  # [K, T] predicted class (classification)


def _from_values(name: str, values: np.ndarray, data: Dataset, task: Task, band: float
                 ) -> _Predictor:
    move = values if is_change_target(data.spec) else values - data.last
    if task == "classification":
        return _Predictor(name, classes=move_classes(move, band))
    return _Predictor(name, values=values, move=move)


def evaluate(
    data: Dataset,
    models: Mapping[str, LSTMModel | None],
    *,
    task: Task = "regression",
    flat_band: float = 0.0,
    ar_order: int = 5,
    ma_window: int = 8,
    season: int | None = None,
    window: str = "test",
    predictions: dict[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Score models and baselines on the ``window`` pairs (``test``, or ``val`` when there is
    no test window), overall and per key. ``season`` None: detected (:func:`detect_season`),
    0: no seasonal baseline. ``predictions``, if given, receives each regression predictor's
    [K, T] next values."""
    predictors: list[_Predictor] = []
    skipped: dict[str, str] = {}
    for name, model in models.items():
        if model is None:
            continue
        why = incompatibility(model, data, task, flat_band)
        if why is not None:
            skipped[name] = why
            continue
        pred = predict(model, data)
        if task == "classification":
            predictors.append(_Predictor(name, classes=pred.argmax(-1)))
        else:
            predictors.append(_from_values(name, pred[..., 0], data, task, flat_band))
    if season is None:
        season = detect_season(data)
    for name, values in baseline_predictions(data, ar_order, ma_window, season).items():
        predictors.append(_from_values(name, values, data, task, flat_band))
    if predictions is not None:
        predictions.update({p.name: p.values for p in predictors if p.values is not None})
    truth = (data.labels(flat_band), data.next, data.moves)
    mask = data.window(window)
    overall = _with_mase({p.name: _score(p, truth, mask) for p in predictors})
    per_key = {
        key: _with_mase({p.name: _score(p, truth, (i, mask[i])) for p in predictors})
        for i, key in enumerate(data.keys) if mask[i].any()
    }
    return {
        "task": task,
        "target": data.spec.target,
        "kind": data.spec.kind,
        "primary": "macro_f1" if task == "classification" else "mae",
        "split": data.split,
        "window": "test" if window == "test" and data.test.any() else "val",
        "baselines": {"ar_order": ar_order, "ma_window": ma_window, "season": season},
        "flat_band": flat_band,
        "overall": overall,
        "per_key": per_key,
        "skipped": skipped,
    }


def _with_mase(scores: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Add MASE (MAE / persistence MAE on the same events) to regression scores."""
    base = scores.get("persistence", {}).get("mae")
    for metrics in scores.values():
        if "mae" in metrics:
            mae = metrics["mae"]
            metrics["mase"] = _clean(mae / base) if mae is not None and base else None
    return scores


Where = np.ndarray | tuple[int, np.ndarray]  # a [K, T] mask, or (row, [T] mask)


def _pick(arr: np.ndarray, where: Where) -> np.ndarray:
    return arr[where[0]][where[1]] if isinstance(where, tuple) else arr[where]


def _score(p: _Predictor, truth: tuple[np.ndarray, ...], where: Where) -> dict[str, Any]:
    labels, actual, actual_move = truth
    if p.classes is not None:
        return classification_metrics(_pick(p.classes, where), _pick(labels, where))
    assert p.values is not None and p.move is not None
    return regression_metrics(_pick(p.values, where), _pick(actual, where),
                              _pick(p.move, where), _pick(actual_move, where))


# --- the gate -------------------------------------------------------------------------------


@dataclass
class GateDecision:
    publish: bool
    reasons: list[str]
    forced: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"publish": self.publish, "reasons": self.reasons, "forced": self.forced}


def gate(
    report: Mapping[str, Any],
    *,
    force: bool = False,
    has_production: bool = False,
    extra_problems: list[str] | None = None,
) -> GateDecision:
    """Publish only if the candidate beats the current model and the best baseline (strictly)
    on the report's window (the test window).

    ``has_production`` says a current model exists: if it could not be scored (different
    features or task) the candidate cannot prove it is better, so it is refused. ``force``
    publishes anyway and keeps the reasons for the record.
    """
    primary = report["primary"]
    higher = primary != "mae"
    overall = report["overall"]
    ours = overall["candidate"][primary]
    problems = list(extra_problems or [])
    baselines = [b for b in BASELINES if b in overall and overall[b].get(primary) is not None]
    best = (max if higher else min)(baselines, key=lambda b: overall[b][primary]) if (
        baselines) else "persistence"
    rivals = [best] + (["production"] if has_production else [])
    for rival in rivals:
        if rival not in overall:
            why = report.get("skipped", {}).get(rival, "not scored")
            problems.append(f"cannot compare with {rival}: {why}")
            continue
        theirs = overall[rival][primary]
        if ours is None or theirs is None:
            problems.append(f"{primary} undefined for candidate or {rival}")
        elif not (ours > theirs if higher else ours < theirs):
            problems.append(f"candidate {primary} {ours:.6g} does not beat {rival} {theirs:.6g}")
    if force and problems:
        return GateDecision(True, problems, forced=True)
    return GateDecision(not problems, problems or [f"candidate beats {', '.join(rivals)}"])


# --- output ---------------------------------------------------------------------------------


_COLUMNS = {
    "regression": (("mae", "MAE"), ("rmse", "RMSE"), ("direction_accuracy", "Dir. acc"),
                   ("mase", "MASE")),
    "classification": (("accuracy", "Accuracy"), ("macro_f1", "Macro-F1")),
}


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _label(name: str, report: Mapping[str, Any]) -> str:
    if name == "ar":
        on = "returns" if report.get("kind") == "tick" else "differences"
        return f"AR({report['baselines']['ar_order']}) on {on}"
    if name == "seasonal_naive":
        return f"seasonal naive ({report['baselines']['season']})"
    if name == "moving_average":
        return f"moving average ({report['baselines']['ma_window']})"
    return name


def render(report: Mapping[str, Any], console: Console, max_keys: int = 10) -> None:
    """The overall table, then the primary metric per key (first ``max_keys`` keys)."""
    cols = _COLUMNS[report["task"]]
    split = report["split"]
    window = report.get("window", "val")
    table = Table(title=f"{window}: {split.get(window + '_pairs')} events "
                        f"(target {report['target']}, {report['task']})")
    table.add_column("model")
    for _, title in cols:
        table.add_column(title, justify="right")
    for name, metrics in report["overall"].items():
        table.add_row(_label(name, report), *(_fmt(metrics.get(k)) for k, _ in cols))
    console.print(table)
    for name, why in report.get("skipped", {}).items():
        console.print(f"[yellow]{name} not scored:[/] {why}")
    per_key = report["per_key"]
    if not per_key or max_keys <= 0:
        return
    primary = report["primary"]
    names = list(report["overall"])
    table = Table(title=f"{primary} per key")
    table.add_column("key")
    for name in names:
        table.add_column(_label(name, report), justify="right")
    keys = sorted(per_key)
    for key in keys[:max_keys]:
        table.add_row(key, *(_fmt(per_key[key][n].get(primary)) for n in names))
    if len(keys) > max_keys:
        table.caption = f"... and {len(keys) - max_keys} more keys (in the artifact metadata)"
    console.print(table)


def for_metadata(report: Mapping[str, Any], max_keys: int = 1000) -> dict[str, Any]:
    """The report as stored in artifact metadata; per-key rows are capped to keep it small."""
    out = dict(report)
    keys = sorted(report["per_key"])
    if len(keys) > max_keys:
        out["per_key"] = {k: report["per_key"][k] for k in keys[:max_keys]}
        out["per_key_truncated"] = len(keys) - max_keys
    return out

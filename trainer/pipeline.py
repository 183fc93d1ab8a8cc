"""One training run end to end: load history, train, evaluate, gate, publish.

Why a module of its own: `trainer train`, `trainer schedule` and the demo run exactly this
sequence, and only here do settings, the registry and the training code meet.

Usage::

    run = run_training(settings, files=[Path("ticks.jsonl")], force=False)
    run.version          # the published version, or None when the gate refused
    run.decision.reasons
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from streamer.artifact import Artifact, load_artifact, save_artifact
from streamer.errors import ArtifactError, ConfigError
from streamer.features import FeatureSpec
from streamer.model import resolve_device
from streamer.registry import Registry, new_version_name
from trainer.data import (
    History,
    decode_history,
    iso,
    parse_offsets,
    parse_time,
    read_files,
)
from trainer.data import resolve_spec as _resolve_spec
from trainer.dataset import Dataset, build_dataset
from trainer.evaluate import GateDecision, evaluate, for_metadata, gate, render
from trainer.report import ReportInput, SeriesInput, write_report
from trainer.search import TrainResult, train_model
from trainer.settings import TrainerSettings
from trainer.topic import read_topic
from trainer.train import Candidate, TrainOptions

log = logging.getLogger(__name__)


def options_from(settings: TrainerSettings) -> TrainOptions:
    return TrainOptions(
        task=settings.task, flat_band=settings.flat_band, hidden=settings.hidden_sizes,
        layers=settings.depth, epochs=settings.epochs, seq_len=settings.seq_len,
        batch_keys=settings.batch_keys, lr=settings.lr, weight_decay=settings.weight_decays,
        dropout=settings.dropouts, patience=settings.patience, clip=settings.clip,
        seed=settings.seed, tolerance=settings.tolerance, folds=settings.folds,
    )


def load_history(
    settings: TrainerSettings,
    files: Sequence[Path] = (),
    base: FeatureSpec | None = None,
    now: float | None = None,
) -> History:
    """History from ``files`` if given, else the Kafka topic slice the settings select.

    ``since``/``until`` select events by their own ``ts`` (the Kafka read seeks to ``since`` by
    record time only to skip old data, and reads to the end offsets); the counts of records read
    and events kept are logged. No record, or no event in the range, is a ConfigError."""
    now = time.time() if now is None else now
    since = parse_time(settings.since, now) if settings.since else None
    until = parse_time(settings.until, now) if settings.until else None
    source: dict[str, Any]
    if files:
        records = read_files(files)
        source = {"source": "files", "files": [str(f) for f in files]}
    else:
        offsets = parse_offsets(settings.from_offsets) if settings.from_offsets else None
        sliced = read_topic(
            settings.bootstrap_servers, settings.topic, since=since, until=None,
            start_offsets=offsets, consumer_config=settings.kafka_security_kwargs(),
        )
        records = sliced.records
        source = {
            "source": "kafka", "topic": settings.topic,
            "offsets": {str(p): list(r) for p, r in sliced.offsets.items()},
        }
    if not records:
        where = ", ".join(source.get("files", [])) or f"topic {settings.topic}"
        raise ConfigError("input", f"no records read from {where}; nothing to train on")
    source.update(since=since, until=until)
    spec = _resolve_spec(records, settings.kind, settings.features, settings.reading_names,
                         settings.target, base, settings.target_kind, settings.extra_names,
                         settings.half_life)
    history = decode_history(records, spec, now, source=source)
    decoded = history.n_events
    history = history.between(since, until)
    lo = "the start" if since is None else iso(since)
    hi = "the end" if until is None else iso(until)
    log.info("history: read %d records, decoded %d events (%d skipped), kept %d events over %d "
             "keys between %s and %s by event time", len(records), decoded,
             sum(history.skipped.values()), history.n_events, len(history.series), lo, hi)
    if history.n_events == 0:
        raise ConfigError("since", f"none of the {decoded} events read lies between {lo} and "
                          f"{hi} (event time)")
    return history


@dataclass
class RunResult:
    training: TrainResult
    data: Dataset
    report: dict[str, Any]
    decision: GateDecision
    version: str | None  # published (or written to --out); None when refused
    production: str | None  # the version the candidate was compared with
    data_range: dict[str, Any]

    @property
    def outcome(self) -> str:
        """success | refused, the trainer_runs_total label."""
        return "success" if self.version is not None else "refused"

    @property
    def val_mae(self) -> float | None:
        value = self.report["overall"]["candidate"].get("mae")
        return None if value is None else float(value)


def _current(registry: Registry) -> Artifact | None:
    if registry.current() is None:
        return None
    try:
        return registry.load()
    except ArtifactError as exc:
        # A broken production model cannot be the bar; the candidate may replace it.
        log.warning("current model is unusable and is not compared against: %s", exc)
        return None


def run_training(
    settings: TrainerSettings,
    files: Sequence[Path] = (),
    *,
    force: bool = False,
    out: Path | None = None,
    console: Console | None = None,
    progress: bool = False,
    report_dir: Path | None = None,
    command: str = "",
) -> RunResult:
    """Train on the history, compare with the current model and baselines, publish if better.

    With ``out`` the chosen model is written there as a plain artifact (no gate, no
    registry change); otherwise it is published as the current version if the gate passes.
    With ``report_dir`` the candidate's HTML report is written there (``command`` in it).
    """
    registry = Registry(settings.registry, settings.model_name)
    current = _current(registry)
    history = load_history(settings, files, current.model.spec if current else None)
    data = build_dataset(history, settings.val_fraction, settings.test_fraction)
    options = _inherit(options_from(settings), settings, current)
    training = train_model(data, options, resolve_device(settings.device), progress, console)
    production = current.model if current else None
    preds: dict[str, Any] = {}
    report = evaluate(
        data, {"candidate": training.model, "production": production}, task=options.task,
        flat_band=options.flat_band, ar_order=settings.ar_order, ma_window=settings.ma_window,
        season=settings.season, predictions=preds,
    )
    decision = gate(report, force=force, has_production=current is not None)
    data_range = {**history.data_range(), **data.split}
    metrics = {
        "evaluation": for_metadata(report),
        "candidates": [c.as_dict() for c in training.candidates],
        "gate": decision.as_dict(),
        "compared_with": current.metadata.version if current else None,
    }
    version: str | None = None
    if out is not None:
        version = new_version_name()
        save_artifact(out, training.model, version, metrics=metrics, data_range=data_range,
                      seed=options.seed)
    elif decision.publish:
        version = registry.publish(training.model, metrics=metrics, data_range=data_range,
                                   seed=options.seed, make_current=True)
    result = RunResult(training, data, report, decision, version,
                       current.metadata.version if current else None, data_range)
    if console is not None:
        print_run(result, console, registry if out is None else None, out)
    if report_dir is not None:
        write_report(report_dir, report_input(
            report, history, data, preds, version or "candidate (not published)", command,
            data_range, [c.as_dict() for c in training.candidates],
            [f"gate: {'; '.join(decision.reasons)}"]))
    return result


def _inherit(options: TrainOptions, settings: TrainerSettings, current: Artifact | None
             ) -> TrainOptions:
    """Unless told otherwise, a retrain keeps the serving model's shape and task, so its
    successor stays comparable and hot-swappable (scheduled runs rely on this)."""
    if current is None:
        return options
    given = settings.model_fields_set
    cfg = current.model.config
    changes: dict[str, Any] = {}
    if not {"hidden", "layers"} & given:
        changes.update(hidden=(cfg.hidden_size,), layers=cfg.num_layers)
    if not {"task", "flat_band"} & given:
        changes.update(task=cfg.task, flat_band=cfg.flat_band)
    if changes:
        log.info("keeping the current model's %s", ", ".join(sorted(changes)))
    return replace(options, **changes)


def evaluate_version(
    settings: TrainerSettings,
    files: Sequence[Path] = (),
    *,
    version: str | None = None,
    model_dir: Path | None = None,
    start: float | None = None,
    end: float | None = None,
    report_dir: Path | None = None,
    command: str = "",
) -> dict[str, Any]:
    """Score a registry version (default: current) or an artifact dir against the current
    model and the baselines on the test window of the given history, or, with ``start`` /
    ``end`` (event time), on exactly the events in [start, end), the events before them
    serving as warm-up. With ``report_dir``, also write the HTML report there."""
    registry = Registry(settings.registry, settings.model_name)
    art = load_artifact(model_dir) if model_dir is not None else registry.load(version)
    current = _current(registry)
    same = current is not None and current.metadata.version == art.metadata.version
    history = load_history(settings, files, art.model.spec)
    data = build_dataset(history, settings.val_fraction, settings.test_fraction)
    if (start is not None or end is not None) and data.score_range(start, end) == 0:
        raise ConfigError("from", f"no event to score between "
                          f"{'the start' if start is None else iso(start)} and "
                          f"{'the end' if end is None else iso(end)}")
    cfg = art.model.config
    preds: dict[str, Any] = {}
    report = evaluate(
        data, {"candidate": art.model, "production": None if same else _model(current)},
        task=cfg.task, flat_band=cfg.flat_band, ar_order=settings.ar_order,
        ma_window=settings.ma_window, season=settings.season, predictions=preds,
    )
    if report_dir is not None:
        write_report(report_dir, report_input(
            report, history, data, preds, art.metadata.version, command,
            {**history.data_range(), **data.split}, art.metadata.metrics.get("candidates", [])))
    return report


def _model(art: Artifact | None) -> Any:
    return None if art is None else art.model


# --- output ---------------------------------------------------------------------------------


def candidates_table(candidates: Sequence[Candidate]) -> Table:
    table = Table(title="candidates: the smallest within tolerance of the best val loss wins",
                  caption="epochs: the best epoch (weights kept) / epochs run before stopping")
    metric = next(iter(candidates[0].score), "score") if candidates else "score"
    for col in ("layers", "hidden", "dropout", "decay", "params", "val loss", f"val {metric}",
                "epochs", ""):
        table.add_column(col, justify="right")
    for c in candidates:
        table.add_row(str(c.layers), str(c.hidden), f"{c.dropout:g}", f"{c.weight_decay:g}",
                      str(c.params), f"{c.val_loss:.4f}", f"{c.score.get(metric, math.nan):.4g}",
                      f"{c.best_epoch}/{c.epochs}", "chosen" if c.chosen else "")
    return table


def print_run(
    result: RunResult, console: Console, registry: Registry | None, out: Path | None
) -> None:
    console.print(candidates_table(result.training.candidates))
    render(result.report, console)
    d = result.decision
    verdict = "[green]passes[/]" if d.publish and not d.forced else (
        "[yellow]forced[/]" if d.forced else "[red]refused[/]")
    console.print(f"gate {verdict}: " + "; ".join(d.reasons))
    if out is not None:
        console.print(f"wrote {result.version} to {out}")
    elif result.version is not None and registry is not None:
        console.print(f"published {result.version} as current of {registry}")


# --- the HTML report ------------------------------------------------------------------------


def report_input(
    report: Mapping[str, Any],
    history: History,
    data: Dataset,
    predictions: Mapping[str, np.ndarray],
    version: str,
    command: str,
    data_range: Mapping[str, Any],
    candidates: Sequence[Mapping[str, Any]],
    notes: Sequence[str] = (),
) -> ReportInput:
    """The adapter from an evaluation (``evaluate``'s report and ``predictions``) to the
    report's plain input: each key's scored pairs (the test window, or the range given to
    ``trainer evaluate --from/--until``) as (time of the predicted event, actual, predicted,
    baselines). MASE comes from the evaluation (MAE over persistence's MAE on the same
    events)."""
    series: dict[str, SeriesInput] = {}
    window = data.window("test")
    for i, key in enumerate(data.keys):
        mask, ts = window[i], history.series[key].ts
        if "candidate" not in predictions or not mask.any():
            continue
        step_ts = np.zeros(mask.shape)
        step_ts[: len(ts) - 1] = ts[1:]  # step t predicts event t+1
        series[key] = SeriesInput(
            step_ts[mask], data.next[i][mask], predictions["candidate"][i][mask],
            {n: p[i][mask] for n, p in predictions.items() if n != "candidate"})
    per_key = {k: {n: dict(m) for n, m in rows.items()} for k, rows in report["per_key"].items()}
    overall = {n: dict(m) for n, m in report["overall"].items()}
    chosen = next((c for c in candidates if c.get("chosen")), None)
    skipped = [f"{n} not scored: {why}" for n, why in report.get("skipped", {}).items()]
    return ReportInput(
        title=f"{data.spec.kind} forecast of {report['target']}: {version}",
        model_version=version, command=command, data_range=data_range,
        target=report["target"], series=series, overall=overall, per_key=per_key,
        candidates=[{k: v for k, v in c.items() if k != "curve"} for c in candidates],
        learning_curves=chosen.get("curve") if chosen else None,
        notes=[*notes, *skipped],
    )

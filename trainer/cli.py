"""`trainer` console script: init, train, evaluate, list, promote, rollback, schedule.

Exit codes: 0 done, 1 the run failed (registry, artifact, Kafka), 2 bad settings or usage,
3 `train`: the gate refused the candidate (nothing was published; the reasons and what to do
next are printed).

    trainer init --kind tick --hidden 64 --layers 2 --registry models
    trainer train --input ticks.jsonl --registry models --layers auto --hidden 32,64
    trainer train --bootstrap-servers kafka:9092 --topic events --since 7d
    trainer evaluate --input ticks.jsonl --registry models
    trainer list --registry models; trainer promote VERSION; trainer rollback
    trainer schedule --every 6h --since 7d --bootstrap-servers kafka:9092
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from streamer.artifact import read_metadata, save_artifact
from streamer.cli import exit_status, stop_on_signals
from streamer.errors import ConfigError, StreamerError
from streamer.features import default_spec
from streamer.metrics import HealthState, MetricsServer
from streamer.model import LSTMModel, ModelConfig
from streamer.registry import Registry, new_version_name
from streamer.settings import add_settings_arguments, settings_from_args, split_host_port
from trainer.data import parse_duration, parse_time
from trainer.evaluate import render
from trainer.pipeline import evaluate_version, run_training
from trainer.schedule import RunSummary, Scheduler, TrainerMetrics
from trainer.settings import REGISTRY_FIELDS, TrainerSettings

log = logging.getLogger("trainer")

_INIT_FIELDS = REGISTRY_FIELDS + (
    "kind", "features", "readings", "target", "target_kind", "extras", "half_life", "task",
    "flat_band", "hidden", "layers",
    "dropout", "seed",
)
_NOT_TRAINING = ("metrics_address", "pushgateway")
# Hyperparameters and feature choices: `evaluate` scores a model as it was built.
_TRAINING_ONLY = (
    "kind", "features", "readings", "target", "target_kind", "extras", "half_life", "task",
    "flat_band", "epochs", "hidden", "layers", "tolerance", "seq_len", "batch_keys", "lr",
    "weight_decay", "dropout", "patience", "clip", "seed", "device", "until",
)


def _exclude(keep: Sequence[str]) -> list[str]:
    return [name for name in TrainerSettings.model_fields if name not in keep] + ["config"]


def _input_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", nargs="+", type=Path, default=[], metavar="FILE",
                   help="JSONL or CSV event files; without them history comes from Kafka")


def _progress_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="live progress display (default: when stderr is a terminal)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trainer", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", help="write a seeded untrained model (artifact or registry)")
    add_settings_arguments(p, TrainerSettings, exclude=_exclude(_INIT_FIELDS))
    p.add_argument("--out", type=Path, help="artifact directory to write instead of publishing")
    p.add_argument("--force", action="store_true",
                   help="publish even when the registry already has a current version")

    p = sub.add_parser("train", help="train, evaluate and publish if better than current")
    add_settings_arguments(p, TrainerSettings, exclude=_NOT_TRAINING)
    _input_args(p)
    _progress_arg(p)
    p.add_argument("--force", action="store_true", help="publish even if the gate refuses")
    p.add_argument("--out", type=Path, help="write the model here instead of the registry")
    p.add_argument("--report", type=Path, metavar="DIR", help="write an HTML report with plots")

    p = sub.add_parser("evaluate", help="score a version against current and baselines")
    add_settings_arguments(p, TrainerSettings, exclude=_NOT_TRAINING + _TRAINING_ONLY)
    _input_args(p)
    p.add_argument("--from", dest="score_from", metavar="TIME",
                   help="score exactly the events from this event time on (ISO-8601, epoch or "
                        "e.g. 2d); the events before it are warm-up")
    p.add_argument("--until", dest="score_until", metavar="TIME",
                   help="score events before this event time (with --from)")
    p.add_argument("--version", help="registry version to score (default: current)")
    p.add_argument("--model", type=Path, help="artifact directory to score instead")
    p.add_argument("--json", type=Path, help="also write the report as JSON here")
    p.add_argument("--keys", type=int, default=10, help="per-key rows to print")
    p.add_argument("--report", type=Path, metavar="DIR", help="write an HTML report with plots")

    for name, text in (("list", "list versions"), ("rollback", "back to the previous version")):
        p = sub.add_parser(name, help=text)
        add_settings_arguments(p, TrainerSettings, exclude=_exclude(REGISTRY_FIELDS))
    p = sub.add_parser("promote", help="make VERSION current")
    add_settings_arguments(p, TrainerSettings, exclude=_exclude(REGISTRY_FIELDS))
    p.add_argument("version", metavar="VERSION")

    p = sub.add_parser("schedule", help="retrain every interval in a long-running process")
    add_settings_arguments(p, TrainerSettings)
    _input_args(p)
    p.add_argument("--every", required=True, help="interval, e.g. 30m, 6h, 1d")
    p.add_argument("--force", action="store_true", help="publish even if the gate refuses")
    p.add_argument("--max-runs", type=int, help="stop after this many runs (default: never)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.command_line = shlex.join(["trainer", *(sys.argv[1:] if argv is None else argv)])
    # Tables of candidates and baselines are wide: don't squeeze them into 80 columns in a
    # pipe or a log file.
    console = Console() if sys.stdout.isatty() else Console(width=140)

    def run() -> int:
        settings = settings_from_args(TrainerSettings, args)
        logging.basicConfig(level=settings.log_level, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return _COMMANDS[args.command](settings, args, console)

    return exit_status("trainer", args.command, run)


def _progress(args: argparse.Namespace) -> bool:
    return sys.stderr.isatty() if args.progress is None else bool(args.progress)


def cmd_init(settings: TrainerSettings, args: argparse.Namespace, console: Console) -> int:
    if settings.depth is None or len(settings.hidden_sizes) != 1:
        raise ConfigError("layers", "init needs one depth and one hidden size, not auto/lists")
    kind = settings.kind or "generic"
    if kind == "tick":
        spec = default_spec(kind, target=settings.target)
    else:
        spec = default_spec(kind, settings.features or 8,
                            settings.reading_names or ("temp", "vibration", "pressure"),
                            settings.target, settings.target_kind or "change",
                            settings.extra_names, settings.half_life)  # type: ignore[arg-type]
    config = ModelConfig(input_size=spec.n_inputs, hidden_size=settings.hidden_sizes[0],
                         num_layers=settings.depth, dropout=settings.dropouts[0],
                         task=settings.task, flat_band=settings.flat_band)
    torch.manual_seed(settings.seed)
    model = LSTMModel(config, spec).eval()
    metrics = {"untrained": True}
    if args.out is not None:
        version = new_version_name()
        save_artifact(args.out, model, version, metrics=metrics, seed=settings.seed)
        console.print(f"wrote untrained {kind} model {version} to {args.out}")
        return 0
    registry = Registry(settings.registry, settings.model_name)
    current = registry.current()
    if current is not None and not args.force:
        # Idempotent, so a deployment can run it on every start without replacing a trained
        # model by an untrained one.
        console.print(f"{registry} already serves {current}; nothing to do (--force to replace)")
        return 0
    version = registry.publish(model, metrics=metrics, seed=settings.seed, make_current=True)
    console.print(f"published untrained {kind} model {version} as current of {registry}")
    return 0


EXIT_REFUSED = 3


def cmd_train(settings: TrainerSettings, args: argparse.Namespace, console: Console) -> int:
    _writable(args.report)
    run = run_training(settings, args.input, force=args.force, out=args.out, console=console,
                       progress=_progress(args), report_dir=args.report,
                       command=args.command_line)
    _said_report(args.report, console)
    if args.out is None and not run.decision.publish:
        console.print("nothing was published. Next: publish anyway with --force, or keep the "
                      "candidate with --out DIR and score it with `trainer evaluate --model DIR`")
        return EXIT_REFUSED
    return 0


def cmd_evaluate(settings: TrainerSettings, args: argparse.Namespace, console: Console) -> int:
    _writable(args.report)
    try:
        start = parse_time(args.score_from) if args.score_from else None
        end = parse_time(args.score_until) if args.score_until else None
    except ValueError as exc:
        raise ConfigError("from", str(exc)) from exc
    report = evaluate_version(settings, args.input, version=args.version, model_dir=args.model,
                              start=start, end=end, report_dir=args.report,
                              command=args.command_line)
    render(report, console, max_keys=args.keys)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
    _said_report(args.report, console)
    return 0


def _writable(directory: Path | None) -> None:
    """Fail before the work, not after it: the report directory must be creatable."""
    try:
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError("report", f"cannot create {directory}: {exc}") from exc


def _said_report(directory: Path | None, console: Console) -> None:
    if directory is not None:
        console.print(f"wrote the report to {directory / 'index.html'}")


def cmd_list(settings: TrainerSettings, args: argparse.Namespace, console: Console) -> int:
    registry = Registry(settings.registry, settings.model_name)
    current = registry.current()
    table = Table(title=f"{registry}")
    table.add_column("")
    table.add_column("version", no_wrap=True)
    for col in ("task", "shape", "target", "test MAE", "persistence MAE"):
        table.add_column(col)
    for version in registry.versions():
        try:
            meta = read_metadata(registry.dir / version)
        except StreamerError as exc:
            table.add_row("", version, f"[red]unreadable: {exc}[/]")
            continue
        overall = meta.metrics.get("evaluation", {}).get("overall", {})
        table.add_row(
            "*" if version == current else "", version, meta.model.task,
            f"{meta.model.num_layers}x{meta.model.hidden_size}",
            f"{meta.features.kind}:{meta.features.target}",
            _num(overall.get("candidate", {}).get("mae")),
            _num(overall.get("persistence", {}).get("mae")),
        )
    console.print(table)
    return 0


def _num(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}"


def cmd_promote(settings: TrainerSettings, args: argparse.Namespace, console: Console) -> int:
    registry = Registry(settings.registry, settings.model_name)
    registry.promote(args.version)
    console.print(f"{registry}: current is now {args.version}")
    return 0


def cmd_rollback(settings: TrainerSettings, args: argparse.Namespace, console: Console) -> int:
    registry = Registry(settings.registry, settings.model_name)
    version = registry.rollback()
    console.print(f"{registry}: rolled back to {version}")
    return 0


def cmd_schedule(settings: TrainerSettings, args: argparse.Namespace, console: Console) -> int:
    try:
        every = parse_duration(args.every)
    except ValueError as exc:
        raise ConfigError("every", str(exc)) from exc

    def run_once() -> RunSummary:
        run = run_training(settings, args.input, force=args.force, console=console)
        return RunSummary(run.outcome, run.version, run.val_mae)

    metrics = TrainerMetrics()
    health = HealthState()
    stop = threading.Event()
    scheduler = Scheduler(run_once, every, metrics, stop=stop, max_runs=args.max_runs,
                          pushgateway=settings.pushgateway, on_beat=health.beat)
    with stop_on_signals(stop):
        if settings.pushgateway is not None:
            scheduler.run()
            return 0
        host, port = split_host_port(settings.metrics_address)
        # A run may take long; liveness means "the loop is alive": allow an interval + 1h.
        with MetricsServer(metrics.registry, health, host, port,
                           heartbeat_timeout_s=every + 3600):
            health.set_ready(True)
            log.info("metrics on %s:%d, retraining every %s", host, port, args.every)
            scheduler.run()
    return 0


_COMMANDS: dict[str, Callable[[TrainerSettings, argparse.Namespace, Console], int]] = {
    "init": cmd_init, "train": cmd_train, "evaluate": cmd_evaluate, "list": cmd_list,
    "promote": cmd_promote, "rollback": cmd_rollback, "schedule": cmd_schedule,
}


if __name__ == "__main__":
    sys.exit(main())

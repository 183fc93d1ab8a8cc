"""Trainer benchmark: validation metrics against the baselines, and the depth `auto` picks.

Simulates tick history (AR(1) momentum in returns, regime-switching volatility), then runs the
same pipeline as `trainer train --layers auto` (time split, train every depth x hidden size,
keep the smallest within tolerance, evaluate, gate, publish into a throwaway registry) and
prints the figures the README cites.

    .venv/bin/python benchmarks/bench_trainer.py                      # 50 keys x 2000 events
    .venv/bin/python benchmarks/bench_trainer.py --keys 20 --events-per-key 1000 --epochs 5
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streamer.simulate import make_simulator, write_jsonl  # noqa: E402
from trainer.pipeline import run_training  # noqa: E402
from trainer.settings import TrainerSettings  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--keys", type=int, default=50)
    p.add_argument("--events-per-key", type=int, default=2000)
    p.add_argument("--hidden", default="32,64")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    console = Console(width=120)
    n_events = args.keys * args.events_per_key
    with tempfile.TemporaryDirectory() as tmp:
        history = Path(tmp) / "ticks.jsonl"
        write_jsonl(history, make_simulator("tick", args.keys, seed=args.seed).events(n_events))
        settings = TrainerSettings(
            registry=Path(tmp) / "models", hidden=args.hidden, layers="auto",
            epochs=args.epochs, seq_len=args.seq_len, seed=args.seed, device=args.device,
            batch_keys=64, patience=4,
        )
        started = time.perf_counter()
        run = run_training(settings, [history], console=console)
        seconds = time.perf_counter() - started
    _summary(args, n_events, run, seconds)
    return 0


def _summary(args: argparse.Namespace, n_events: int, run: object, seconds: float) -> None:
    report = run.report  # type: ignore[attr-defined]
    split = report["split"]
    device = "cuda" if args.device == "cuda" or (
        args.device == "auto" and torch.cuda.is_available()) else "cpu"
    print()
    print(f"== trainer benchmark: simulated ticks, {args.keys} keys x {args.events_per_key} "
          f"events = {n_events} events (seed {args.seed})")
    print(f"   {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"device {device}, threads {torch.get_num_threads()}; whole run {seconds:.1f} s")
    print(f"   validation: newest {split['val_fraction']:.0%} by time, {split['val_pairs']} "
          f"events; target next log_return")
    print(f"   {'model':<26}{'MAE':>12}{'RMSE':>12}{'dir.acc':>10}{'MAE/persist':>13}")
    persist = report["overall"]["persistence"]["mae"]
    names = {"candidate": "LSTM candidate", "persistence": "persistence",
             "moving_average": f"moving average ({report['baselines']['ma_window']})",
             "ar": f"AR({report['baselines']['ar_order']}) per key"}
    for name, m in report["overall"].items():
        if name not in names:
            continue
        acc = "-" if m["direction_accuracy"] is None else f"{m['direction_accuracy']:.4f}"
        print(f"   {names[name]:<26}{m['mae']:>12.4e}{m['rmse']:>12.4e}{acc:>10}"
              f"{m['mae'] / persist:>13.3f}")
    print("   --layers auto candidates (val loss = normalized MSE; tolerance 1%):")
    for c in run.training.candidates:  # type: ignore[attr-defined]
        mark = "  <- chosen" if c.chosen else ""
        print(f"     layers={c.layers} hidden={c.hidden:<3} params={c.params:<6} "
              f"val_loss={c.val_loss:.5f} val_mae={c.score['mae']:.4e} "
              f"epochs={c.best_epoch}/{c.epochs} {c.seconds:.1f}s{mark}")
    print(f"   gate: {'published' if run.version else 'refused'} "  # type: ignore[attr-defined]
          f"({'; '.join(run.decision.reasons)})")  # type: ignore[attr-defined]


if __name__ == "__main__":
    sys.exit(main())

"""``streamer demo``: the whole product on an embedded broker, for a bounded time.

It starts the embedded broker, trains a first model on simulated history (via the ``trainer``
console script, run as a separate process so that ``streamer`` never imports ``trainer``),
starts the streamer, the metrics server and the simulator, retrains once a third of the way
in so that a live hot swap can be watched, and shows a console view until the time is up.
Then it drains, commits and prints a summary.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

from streamer.broker import EmbeddedBroker
from streamer.collectors import MetricsSnapshot
from streamer.demo_clients import PredictionWatcher, send_in_turn
from streamer.service import Service
from streamer.settings import StreamerSettings
from streamer.simulate import make_simulator, run_simulator, write_jsonl

log = logging.getLogger(__name__)



def _trainer(*args: str, quiet: bool = False) -> None:
    """Run the trainer CLI in its own process (its report goes to our terminal unless quiet)."""
    cmd = [sys.executable, "-m", "trainer.cli", *args]
    done = subprocess.run(cmd, capture_output=quiet, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"trainer failed ({done.returncode}): {done.stderr or ''}"[-2000:])


def _train_first_model(
    registry: Path, kind: str, n_keys: int, seed: int, n_history: int, console: Console
) -> None:
    history = registry.parent / "history.jsonl"
    write_jsonl(history, make_simulator(kind, n_keys, seed + 1000).events(n_history))  # type: ignore[arg-type]
    console.print(f"[bold]1/3[/] training a first model on {n_history:,} simulated events")
    _trainer("train", "--input", str(history), "--kind", kind, "--registry", str(registry),
             "--epochs", "3", "--hidden", "32", "--layers", "2", "--force", "--no-progress")


class _Retrain:
    """The mid-demo retraining, in the background; ``status`` feeds the console view."""

    def __init__(self, registry: Path, kind: str, n_keys: int, seed: int, n_history: int) -> None:
        self.status = "retraining on fresh history (background process)"
        self._args = (registry, kind, n_keys, seed, n_history)
        threading.Thread(target=self._run, name="demo-retrain", daemon=True).start()

    def _run(self) -> None:
        registry, kind, n_keys, seed, n_history = self._args
        history = registry.parent / "history2.jsonl"
        write_jsonl(history, make_simulator(kind, n_keys, seed + 2000).events(n_history))  # type: ignore[arg-type]
        try:
            _trainer("train", "--input", str(history), "--kind", kind, "--registry",
                     str(registry), "--epochs", "2", "--hidden", "32", "--layers", "2",
                     "--force", "--no-progress", "--seed", str(seed + 1), quiet=True)
        except RuntimeError as exc:
            self.status = f"retraining failed: {exc}"
            return
        self.status = "published a new version: the streamer swaps it in between batches"


# Malformed messages the demo mixes in, so the dead-letter path is visible too.
_BAD_MESSAGES: tuple[bytes, ...] = (
    b"{not json",
    b'{"symbol": "SYM0000", "ts": "yesterday-ish", "price": 1.0, "size": 1}',
    b'{"symbol": "SYM0000", "ts": 1, "price": -5, "size": 1}',
    b'{"ts": 1, "price": 1.0}',
)


LATENCY = "streamer_end_to_end_latency_seconds"


def _swaps(snap: MetricsSnapshot) -> float:
    return snap.total("streamer_model_swaps_total", outcome="success")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.1f} ms"


def _view(service: Service, snap: MetricsSnapshot, rate: float, p50: float | None,
          p99: float | None, watcher: PredictionWatcher, left: float,
          retrain: _Retrain | None) -> Table:
    table = Table(title=f"streamer demo — {left:.0f}s left", show_header=False, expand=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("events/s", f"{rate:,.0f}")
    table.add_row("end-to-end p50 / p99", f"{_ms(p50)} / {_ms(p99)}")
    table.add_row("events in / predictions out",
                  f"{snap.total('streamer_events_in_total'):,.0f} / "
                  f"{snap.total('streamer_predictions_out_total'):,.0f}")
    table.add_row("dead-lettered", f"{snap.total('streamer_dead_letter_total'):,.0f} "
                  f"(the demo mixes in a malformed message every 2 s)")
    table.add_row("keys resident", f"{len(service.store):,}")
    table.add_row("model version", f"{service.version}  (hot swaps: {_swaps(snap):.0f})")
    if retrain is not None:
        table.add_row("trainer", retrain.status)
    for p in list(watcher.recent)[-5:]:
        pred = ", ".join(f"{v:+.5f}" for v in p["prediction"])
        table.add_row(f"  {p['key']}", f"[{pred}]  ({p['model_version']})")
    return table


def run_demo(
    duration_s: float = 60.0, kind: str = "tick", n_keys: int = 200, rate: float = 2000.0,
    seed: int = 0, metrics_address: str = "127.0.0.1:9108", workdir: str | None = None,
    stop: threading.Event | None = None, n_history: int = 40_000,
) -> int:
    console = Console()
    stop = stop or threading.Event()
    tmp = tempfile.TemporaryDirectory(prefix="streamer-demo-") if workdir is None else None
    root = Path(workdir or tmp.name)  # type: ignore[union-attr]
    registry = root / "registry"
    registry.mkdir(parents=True, exist_ok=True)
    try:
        with EmbeddedBroker() as broker:
            for topic, parts in (("events", 4), ("predictions", 4), ("events.dlq", 1)):
                broker.create_topic(topic, partitions=parts)
            console.print(f"embedded Kafka broker on [bold]{broker.bootstrap_servers}[/]")
            _train_first_model(registry, kind, n_keys, seed, n_history, console)
            settings = StreamerSettings(
                bootstrap_servers=broker.bootstrap_servers, model=registry, device="auto",
                metrics_address=metrics_address, registry_poll_s=1.0, lag_interval_s=1.0,
            )
            return _stream(settings, broker.bootstrap_servers, registry, kind, n_keys, rate,
                           seed, duration_s, stop, console, n_history)
    finally:
        if tmp is not None:
            tmp.cleanup()


def _stream(settings: StreamerSettings, bootstrap: str, registry: Path, kind: str, n_keys: int,
            rate: float, seed: int, duration_s: float, stop: threading.Event,
            console: Console, n_history: int) -> int:
    service = Service.from_settings(settings)
    svc_stop, sim_stop = threading.Event(), threading.Event()
    svc = threading.Thread(target=service.run, args=(svc_stop,), name="demo-streamer")
    svc.start()
    sim = threading.Thread(
        target=run_simulator, name="demo-simulator",
        kwargs=dict(bootstrap_servers=bootstrap, topic=settings.input_topic, kind=kind,
                    n_keys=n_keys, rate=rate, seed=seed, stop_event=sim_stop),
    )
    sim.start()
    bad = threading.Thread(target=send_in_turn, name="demo-bad-input",
                           args=(bootstrap, settings.input_topic, b"SYM0000", _BAD_MESSAGES,
                                 sim_stop))
    bad.start()
    console.print(f"[bold]2/3[/] streaming {rate:,.0f} {kind} events/s over {n_keys} keys; "
                  f"metrics on http://{settings.metrics_address}/metrics")
    watcher = PredictionWatcher(bootstrap, settings.output_topic)
    start = time.monotonic()
    retrain: _Retrain | None = None
    old: MetricsSnapshot | None = None
    old_t = start
    try:
        with Live(console=console, refresh_per_second=2, transient=False) as live:
            while not stop.is_set() and (left := duration_s - (time.monotonic() - start)) > 0:
                if retrain is None and time.monotonic() - start > duration_s / 3:
                    retrain = _Retrain(registry, kind, n_keys, seed, n_history)
                snap, now = MetricsSnapshot(service.metrics.registry), time.monotonic()
                done = snap.total("streamer_events_in_total")
                before = old.total("streamer_events_in_total") if old else 0.0
                ev_rate = (done - before) / max(now - old_t, 1e-9)
                live.update(_view(service, snap, ev_rate, snap.quantile(0.5, LATENCY, old),
                                  snap.quantile(0.99, LATENCY, old), watcher, left, retrain))
                old, old_t = snap, now
                stop.wait(1.0)
    finally:
        sim_stop.set()
        sim.join(timeout=30)
        bad.join(timeout=10)
        svc_stop.set()
        svc.join(timeout=60)
        watcher.stop()
    return _summary(console, service, duration_s, watcher)


def _summary(
    console: Console, service: Service, duration_s: float, watcher: PredictionWatcher
) -> int:
    snap = MetricsSnapshot(service.metrics.registry)
    console.print()
    console.print("[bold]3/3[/] summary")
    console.print(f"  events in            {snap.total('streamer_events_in_total'):,.0f}")
    console.print(f"  predictions out      {snap.total('streamer_predictions_out_total'):,.0f}")
    console.print(f"  dead-lettered        {snap.total('streamer_dead_letter_total'):,.0f}")
    console.print(f"  end-to-end p50 / p99 {_ms(snap.quantile(0.5, LATENCY))} / "
                  f"{_ms(snap.quantile(0.99, LATENCY))}")
    console.print(f"  model versions seen  {', '.join(sorted(watcher.versions)) or '-'}")
    console.print(f"  hot swaps            {_swaps(snap):.0f}")
    console.print(f"  serving at the end   {service.version}")
    return 0

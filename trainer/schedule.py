"""`trainer schedule`: retrain at a fixed interval in one long-running process.

Why it never dies on a failed run: a broker outage or a bad batch of history at 03:00 must
not take retraining down until someone restarts it; the run is logged, counted as
``trainer_runs_total{outcome="failed"}`` and the next interval simply tries again.
Metrics are served on the trainer's own /metrics (default port 9109), or pushed to a
Pushgateway after every run when one is configured (the scheduler may live behind NAT, or be a
one-shot Kubernetes CronJob: ``trainer schedule --max-runs 1 --pushgateway ...``). Pushes add
to the job's group (HTTP POST) and a process that has not succeeded yet leaves
``trainer_last_success_timestamp_seconds`` out, so a failed run never erases the time of the
last success an earlier run pushed.

Usage::

    metrics = TrainerMetrics()
    Scheduler(lambda: run_training(settings), every_s=6 * 3600, metrics=metrics).run()
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, pushadd_to_gateway
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

OUTCOMES = ("success", "failed", "refused")
DURATION_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0,
                    7200.0, 14400.0)


@dataclass(frozen=True)
class RunSummary:
    """What the scheduler needs to know of a finished run."""

    outcome: str  # success | refused
    version: str | None = None
    val_mae: float | None = None


class TrainerMetrics:
    """Every ``trainer_*`` metric on an injectable registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        reg = self.registry
        self.last_success = Gauge(
            "trainer_last_success_timestamp_seconds",
            "End time of the last run that published a version.", registry=reg,
        )
        self.duration = Histogram(
            "trainer_run_duration_seconds", "Wall time of one training run.",
            buckets=DURATION_BUCKETS, registry=reg,
        )
        self.val_mae = Gauge(
            "trainer_validation_mae", "MAE of the last run's candidate on the test window.",
            registry=reg,
        )
        self.published = Gauge(
            "trainer_published_version_info", "1 for the last version this trainer published.",
            ["version"], registry=reg,
        )
        self.runs = Counter(
            "trainer_runs_total", "Training runs by outcome.", ["outcome"], registry=reg
        )
        self._runs = {o: self.runs.labels(o) for o in OUTCOMES}  # all start at 0
        self._version: str | None = None
        self.succeeded = False  # whether this process ever set last_success

    def observe(self, outcome: str, seconds: float, summary: RunSummary | None) -> None:
        self._runs[outcome].inc()
        self.duration.observe(seconds)
        if summary is None:
            return
        if summary.val_mae is not None and math.isfinite(summary.val_mae):
            self.val_mae.set(summary.val_mae)
        if outcome == "success":
            self.succeeded = True
            self.last_success.set(time.time())
            if summary.version is not None:
                self._set_version(summary.version)

    def _set_version(self, version: str) -> None:
        if self._version is not None and self._version != version:
            self.published.remove(self._version)
        self.published.labels(version).set(1)
        self._version = version


class Scheduler:
    """Runs ``run_once`` now and then every ``every_s`` seconds until stopped.

    Ticks are on a fixed grid from the start, so a slow run delays only itself; ticks a run
    overran are skipped rather than run back to back.
    """

    def __init__(
        self,
        run_once: Callable[[], RunSummary],
        every_s: float,
        metrics: TrainerMetrics,
        *,
        stop: threading.Event | None = None,
        max_runs: int | None = None,
        pushgateway: str | None = None,
        job: str = "trainer",
        on_beat: Callable[[], None] | None = None,
    ) -> None:
        if not every_s > 0:
            raise ValueError("the interval must be positive")
        self.run_once = run_once
        self.every_s = every_s
        self.metrics = metrics
        self.stop = stop or threading.Event()
        self.max_runs = max_runs
        self.pushgateway = pushgateway
        self.job = job
        self.on_beat = on_beat or (lambda: None)
        self.runs = 0

    def run(self) -> int:
        """Loop until ``stop`` is set or ``max_runs`` ran; returns the number of runs."""
        start = time.monotonic()
        while not self.stop.is_set():
            self.tick()
            if self.max_runs is not None and self.runs >= self.max_runs:
                break
            elapsed = time.monotonic() - start
            next_at = start + (math.floor(elapsed / self.every_s) + 1) * self.every_s
            self._sleep_until(next_at)
        return self.runs

    def tick(self) -> str:
        """One run, whatever happens inside it; returns its outcome."""
        self.runs += 1
        began = time.monotonic()
        summary: RunSummary | None = None
        try:
            summary = self.run_once()
            outcome = summary.outcome
        except Exception:
            # Anything a run raises is that run's failure, never the scheduler's.
            log.exception("training run %d failed; retrying at the next interval", self.runs)
            outcome = "failed"
        seconds = time.monotonic() - began
        self.metrics.observe(outcome, seconds, summary)
        log.info("run %d: %s in %.1fs", self.runs, outcome, seconds)
        self._push()
        return outcome

    def _sleep_until(self, deadline: float) -> None:
        while not self.stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self.on_beat()
            self.stop.wait(min(left, 1.0))

    def _push(self) -> None:
        if self.pushgateway is None:
            return
        registry = self.metrics.registry
        if not self.metrics.succeeded:
            registry = CollectorRegistry(auto_describe=False)
            registry.register(_Without(self.metrics.registry, self.metrics.last_success))
        try:
            pushadd_to_gateway(self.pushgateway, job=self.job, registry=registry, timeout=10)
        except Exception as exc:  # a missed push must not cost the next run
            log.warning("push to %s failed: %s", self.pushgateway, exc)


class _Without(Collector):
    """``registry``'s metrics except the one ``skip`` exports (for a push)."""

    def __init__(self, registry: CollectorRegistry, skip: Gauge) -> None:
        self.registry = registry
        self.skip = {m.name for m in skip.collect()}

    def collect(self) -> list[Metric]:
        return [m for m in self.registry.collect() if m.name not in self.skip]

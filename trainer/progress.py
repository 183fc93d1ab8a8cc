"""The live training display: one bar per candidate with epoch count, losses and time left.

Usage::

    with training_progress(enabled=True, epochs=30, console=None) as view:
        task = view.add(config) if view else None
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from streamer.model import ModelConfig


class TrainingProgress:
    """One bar per candidate: epoch count, train and validation loss, time left."""

    def __init__(self, epochs: int, console: Console | None) -> None:
        self.epochs = epochs
        self.bar = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("train {task.fields[train]}"), TextColumn("val {task.fields[val]}"),
            TextColumn("best {task.fields[best]}"), TimeElapsedColumn(), TimeRemainingColumn(),
            console=console or Console(stderr=True), transient=False,
        )

    def add(self, config: ModelConfig, weight_decay: float = 0.0) -> TaskID:
        return self.bar.add_task(
            f"layers={config.num_layers} hidden={config.hidden_size} "
            f"dropout={config.dropout:g} wd={weight_decay:g}", total=self.epochs,
            train="-", val="-", best="-",
        )

    def epoch(self, task: TaskID, train: float, val: float, best: float) -> None:
        self.bar.update(task, advance=1, train=f"{train:.4f}", val=f"{val:.4f}",
                        best=f"{best:.4f}")

    def finish(self, task: TaskID, best_epoch: int) -> None:
        """Early stopping ends a bar short; fill it and say which epoch was kept."""
        desc = self.bar.tasks[task].description
        self.bar.update(task, completed=self.epochs, description=f"{desc} (best {best_epoch})")


@contextmanager
def training_progress(
    enabled: bool, epochs: int, console: Console | None
) -> Iterator[TrainingProgress | None]:
    if not enabled:
        yield None
        return
    view = TrainingProgress(epochs, console)
    with view.bar:
        yield view

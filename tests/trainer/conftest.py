"""Shared trainer fixtures: simulated history files and small, fast settings."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from streamer.simulate import make_simulator, write_jsonl
from trainer.settings import TrainerSettings


@pytest.fixture(scope="session")
def tick_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 symbols, 6000 ticks: enough for the AR(1) momentum to be learnable in seconds."""
    path = tmp_path_factory.mktemp("history") / "ticks.jsonl"
    write_jsonl(path, make_simulator("tick", 12, seed=3).events(6000))
    return path


@pytest.fixture(scope="session")
def generic_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 keys, 6000 events of a VAR(1): the other values predict v0, which a univariate AR on
    v0's differences cannot use, so a trained model beats every baseline in seconds."""
    path = tmp_path_factory.mktemp("history") / "generic.jsonl"
    write_jsonl(path, make_simulator("generic", 12, seed=3, n_values=4).events(6000))
    return path


@pytest.fixture(scope="session")
def small_tick_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("history") / "small.jsonl"
    write_jsonl(path, make_simulator("tick", 4, seed=5).events(1200))
    return path


def fast_settings(registry: Path, **overrides: Any) -> TrainerSettings:
    """Tiny model, few epochs, CPU: each run takes a second or two."""
    values: dict[str, Any] = {
        "registry": registry, "hidden": "16", "layers": "1", "epochs": 3, "seq_len": 32,
        "device": "cpu", "patience": 3,
    }
    values.update(overrides)
    return TrainerSettings(**values)


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Tiny LSTMs run fastest on one thread; on a shared 2-core box, more threads spin-wait
    against other processes and make test times erratic. Restored after each test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)

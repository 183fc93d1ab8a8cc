"""Shared builders for the streamer tests: small seeded models and specs.

``STREAMER_TEST_DEVICE=cuda`` runs the equivalence tests (model, engine) on a GPU:
scripts/check_cuda.sh does that on a machine that has one.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from streamer.artifact import save_artifact
from streamer.features import FeatureSpec, default_spec
from streamer.model import LSTMModel, ModelConfig

TEST_DEVICE = torch.device(os.environ.get("STREAMER_TEST_DEVICE", "cpu"))


def make_model(
    spec: FeatureSpec | None = None, hidden: int = 16, layers: int = 2, seed: int = 0,
    task: str = "regression", device: torch.device | str = "cpu",
) -> LSTMModel:
    spec = spec or default_spec("generic", n_features=4)
    torch.manual_seed(seed)
    cfg = ModelConfig(input_size=spec.n_inputs, hidden_size=hidden, num_layers=layers, task=task)
    return LSTMModel(cfg, spec).eval().to(device)


@pytest.fixture
def generic_spec() -> FeatureSpec:
    return default_spec("generic", n_features=4)


@pytest.fixture
def touchy_artifact(tmp_path: Path) -> Path:
    """A model whose input scaling overflows float32 for large but finite inputs (near 3e38):
    its step goes non-finite, so the state guard runs."""
    spec = default_spec("generic", n_features=4).with_stats([0.0] * 4, [1e-3] * 4)
    path = tmp_path / "touchy"
    save_artifact(path, make_model(spec=spec, seed=7), version="v-touchy")
    return path

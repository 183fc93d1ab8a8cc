"""Shared builders for the streamer tests: small seeded models and specs."""

from __future__ import annotations

import pytest
import torch

from streamer.features import FeatureSpec, default_spec
from streamer.model import LSTMModel, ModelConfig


def make_model(
    spec: FeatureSpec | None = None, hidden: int = 16, layers: int = 2, seed: int = 0,
    task: str = "regression",
) -> LSTMModel:
    spec = spec or default_spec("generic", n_features=4)
    torch.manual_seed(seed)
    cfg = ModelConfig(input_size=spec.n_features, hidden_size=hidden, num_layers=layers, task=task)
    return LSTMModel(cfg, spec).eval()


@pytest.fixture
def generic_spec() -> FeatureSpec:
    return default_spec("generic", n_features=4)

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from streamer.features import default_spec

from .conftest import TEST_DEVICE
from .conftest import make_model as _make_model


def make_model(**kw):  # every model of this module lives on the test device
    return _make_model(device=TEST_DEVICE, **kw)


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_step_by_step_equals_full_sequence_forward(layers: int) -> None:
    model = make_model(layers=layers, hidden=32)
    x = torch.randn(5, 40, 4, device=TEST_DEVICE)
    with torch.no_grad():
        y_full, (h_full, c_full) = model(x)
        h, c = model.zero_state(5)
        steps = []
        for t in range(x.shape[1]):
            y, h, c = model.step(x[:, t], h, c)
            steps.append(y)
    assert_close(torch.stack(steps, dim=1), y_full, atol=1e-5, rtol=1e-5)
    assert_close(h, h_full, atol=1e-5, rtol=1e-5)
    assert_close(c, c_full, atol=1e-5, rtol=1e-5)


def test_padded_forward_equals_per_row_forward() -> None:
    model = make_model()
    lengths = torch.tensor([7, 3, 1, 5])
    x = torch.randn(4, 7, 4, device=TEST_DEVICE)
    h0 = torch.randn(2, 4, 16, device=TEST_DEVICE)
    c0 = torch.randn(2, 4, 16, device=TEST_DEVICE)
    with torch.no_grad():
        y, h, c = model.forward_padded(x, lengths, h0, c0)
        for b, n in enumerate(lengths.tolist()):
            yb, (hb, cb) = model(x[b : b + 1, :n], (h0[:, b : b + 1], c0[:, b : b + 1]))
            assert_close(y[b, :n], yb[0], atol=1e-5, rtol=1e-5)
            assert_close(h[:, b], hb[:, 0], atol=1e-5, rtol=1e-5)
            assert_close(c[:, b], cb[:, 0], atol=1e-5, rtol=1e-5)


def test_normalization_and_output_units() -> None:
    spec = default_spec("generic", n_features=2).with_stats([10.0, -1.0], [2.0, 0.5])
    model = make_model(spec=spec)
    x = torch.tensor([[12.0, -1.5]], device=TEST_DEVICE)
    assert_close(model.normalize(x), torch.tensor([[1.0, -1.0]], device=TEST_DEVICE))
    y = torch.tensor([[1.0]], device=TEST_DEVICE)
    assert_close(model.to_prediction(y), torch.tensor([[12.0]], device=TEST_DEVICE))
    clf = make_model(task="classification")
    probs = clf.to_prediction(torch.randn(3, 3, device=TEST_DEVICE))
    assert probs.shape == (3, 3)
    assert_close(probs.sum(-1), torch.ones(3, device=TEST_DEVICE))


def test_model_rejects_spec_with_other_width() -> None:
    from streamer.model import LSTMModel, ModelConfig

    with pytest.raises(ValueError, match="features"):
        LSTMModel(ModelConfig(input_size=3), default_spec("generic", n_features=4))


def test_resolve_device_is_one_function_for_both_processes() -> None:
    """The streamer and the trainer share it: cpu and auto always work, a CUDA device torch
    cannot see (cuda, cuda:1) or a bad name fails at start naming the `device` setting."""
    from streamer.errors import ConfigError
    from streamer.model import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    missing = torch.cuda.device_count()  # an index one past the last device
    with pytest.raises(ConfigError, match="device"):
        resolve_device(f"cuda:{missing}")
    with pytest.raises(ConfigError, match="device"):
        resolve_device("tpu-please")

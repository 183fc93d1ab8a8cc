"""The slow, obvious reference the fast paths are proved against: per key, the whole history
run through the model's full-sequence forward, one prediction per event."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch

from streamer.features import sequence_inputs, to_value
from streamer.model import LSTMModel


@torch.no_grad()
def reference_predictions(
    model: LSTMModel, keys: Sequence[str], raw: np.ndarray, ts: np.ndarray
) -> np.ndarray:
    """[N, out]: event i's prediction from its key's full history up to and including i."""
    by_key: dict[str, list[int]] = defaultdict(list)
    for i, k in enumerate(keys):
        by_key[k].append(i)
    out = np.zeros((len(keys), model.config.output_size), dtype=np.float32)
    device = model.x_mean.device
    for idx in by_key.values():
        r = torch.as_tensor(raw[idx], dtype=torch.float64, device=device)
        t = torch.as_tensor(ts[idx], dtype=torch.float64, device=device)
        x, loc, scale = sequence_inputs(model.spec, r, t)
        y, _ = model(x.unsqueeze(0))
        pred = model.to_prediction(y[0])
        col = model.spec.target_raw_column
        if model.config.task == "regression" and col is not None:
            pred = to_value(model.spec, pred[:, 0].double(), r[:, col], loc, scale)[:, None]
        out[idx] = pred.cpu().numpy()
    return out

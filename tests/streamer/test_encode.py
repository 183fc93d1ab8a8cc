"""The batch encoder gives, record for record, what json.dumps of one dict per event gives."""

from __future__ import annotations

import json

import numpy as np
import pytest

from streamer.encode import encode_predictions


def _reference(keys, ts_raw, parts, offsets, preds, version, emitted_at,  # type: ignore[no-untyped-def]
               changes=None):
    out = []
    for j, (k, t, p, o) in enumerate(zip(keys, ts_raw, parts, offsets, strict=True)):
        record = {"key": k, "ts": t, "partition": p, "offset": o,
                  "prediction": preds[j].tolist(), "model_version": version,
                  "emitted_at": emitted_at}
        if changes is not None:
            record["change"] = [float(changes[j])]
        out.append(json.dumps(record, separators=(",", ":"), allow_nan=False))
    return out


@pytest.mark.parametrize("out,with_change", [(1, False), (3, False), (1, True)])
def test_same_records_as_one_dict_per_event(out: int, with_change: bool) -> None:
    rng = np.random.default_rng(0)
    n = 500
    keys = [f"k{i}" for i in range(n - 4)] + ['quo"te', "back\\slash", "ünï€😀", "a,b],[c"]
    ts_raw: list[object] = [1.7e9 + i * 0.001 for i in range(n - 3)] + [
        1_700_000_000_123, "2024-01-02T03:04:05Z", 5e-324]
    parts = rng.integers(0, 16, n).tolist()
    offsets = rng.integers(0, 2**40, n).tolist()
    preds = (rng.normal(size=(n, out)) * 10.0 ** rng.integers(-12, 12, (n, out))).astype(
        np.float32)
    preds[0] = 0.0
    preds[1] = -0.0
    changes = preds[:, 0] - rng.normal(size=n) if with_change else None
    got = encode_predictions(keys, ts_raw, parts, offsets, preds, "v-1", 1.7e9 + 0.25, changes)
    want = _reference(keys, ts_raw, parts, offsets, preds, "v-1", 1.7e9 + 0.25, changes)
    assert len(got) == n
    for g, w in zip(got, want, strict=True):
        assert json.loads(g) == json.loads(w)  # same keys, values and float bits


def test_non_finite_predictions_are_refused_not_printed_as_null() -> None:
    preds = np.array([[1.0], [np.nan]], dtype=np.float32)
    with pytest.raises(ValueError, match="non-finite"):
        encode_predictions(["a", "b"], [1.0, 2.0], [0, 0], [0, 1], preds, "v", 0.0)
    assert encode_predictions([], [], [], [], np.zeros((0, 1)), "v", 0.0) == []

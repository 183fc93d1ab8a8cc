"""The prediction message of a change-target model with per-key normalization, through the
embedded broker: ``prediction`` is the next value in the target's units and equals the offline
per-key reference; ``change`` is that prediction minus the event's own target value."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from torch.testing import assert_close

from streamer.artifact import save_artifact
from streamer.features import default_spec

from ..kafka_helpers import Topics, json_values, produce, read_topic
from ..reference import reference_predictions
from .conftest import make_model
from .service_helpers import running_service, settings_for


def test_prediction_is_the_next_value_and_change_is_relative_to_the_last(
    topics: Topics, tmp_path: Path
) -> None:
    spec = default_spec("generic", n_features=3, target="v1", target_kind="change",
                        extras=("diff", "dt", "hour", "dow"), half_life=10.0)
    spec = spec.with_stats([0.0] * spec.n_inputs, [1.0] * spec.n_inputs, (0.0, 0.5))
    model = make_model(spec=spec, seed=4)
    save_artifact(tmp_path / "model", model, "v-change")
    rng = np.random.default_rng(2)
    n, now = 300, time.time()
    keys = [f"s{int(k)}" for k in rng.integers(0, 6, size=n)]
    values = (60 + np.cumsum(rng.normal(size=(n, 3)), axis=0)).round(4)
    ts = [now - 3600 + 10.0 * i for i in range(n)]
    records = [(k.encode(), json.dumps({"ts": t, "values": v.tolist()}).encode())
               for k, t, v in zip(keys, ts, values, strict=True)]
    with running_service(settings_for(topics, tmp_path / "model")):
        coords = produce(topics.bootstrap, topics.input, records)
        out = json_values(read_topic(topics.bootstrap, topics.output, expect=n))
    by_coord = {(o["partition"], o["offset"]): o for o in out}
    got = np.asarray([by_coord[c]["prediction"] for c in coords], dtype=np.float32)
    change = np.asarray([by_coord[c]["change"] for c in coords])
    expected = reference_predictions(model, keys, values, np.asarray(ts))
    assert_close(got, expected, atol=1e-4, rtol=1e-5)
    assert_close(change[:, 0], got[:, 0].astype(np.float64) - values[:, 1], atol=1e-9, rtol=0)
    assert np.abs(change).max() < 50  # a change target stays near the last value

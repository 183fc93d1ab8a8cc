"""End to end through the embedded broker: real Kafka clients, real HTTP, real files."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from torch.testing import assert_close

from streamer.artifact import load_artifact

from ..kafka_helpers import Topics, json_values, produce, read_topic
from ..reference import reference_predictions
from .service_helpers import running_service, sample, scrape, settings_for


def _generic_events(n: int, n_keys: int, seed: int = 0) -> tuple[list[str], np.ndarray, list]:
    rng = np.random.default_rng(seed)
    keys = [f"key-{int(k)}" for k in rng.integers(0, n_keys, size=n)]
    values = rng.normal(size=(n, 4)).round(6)
    now = time.time()
    ts = [round(now - 5 + i * 1e-3, 6) for i in range(n)]
    return keys, values, ts


def _encode(keys: list[str], values: np.ndarray, ts: list) -> list[tuple[bytes, bytes]]:
    return [
        (k.encode(), json.dumps({"key": k, "ts": t, "values": v.tolist()}).encode())
        for k, v, t in zip(keys, values, ts, strict=True)
    ]


def test_one_prediction_per_offset_equal_to_offline_reference(
    topics: Topics, artifact_dir: Path
) -> None:
    n = 3000
    keys, values, ts = _generic_events(n, n_keys=120)
    settings = settings_for(topics, artifact_dir)
    with running_service(settings) as service:
        coords = produce(topics.bootstrap, topics.input, _encode(keys, values, ts))
        out = json_values(read_topic(topics.bootstrap, topics.output, expect=n))
        port = service.http.port
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the histogram is observed right after the ack
            _, text = scrape(port)
            if sample(text, "streamer_end_to_end_latency_seconds_count") >= n:
                break
            time.sleep(0.05)

    by_coord = {(o["partition"], o["offset"]): o for o in out}
    assert len(out) == n, "exactly one prediction per input offset, no duplicates"
    assert set(by_coord) == set(coords), "no gaps"
    for i, coord in enumerate(coords):
        o = by_coord[coord]
        assert o["key"] == keys[i] and o["ts"] == ts[i] and o["model_version"] == "v-test-1"
    model = load_artifact(artifact_dir).model
    expected = reference_predictions(model, keys, values, np.asarray(ts))
    got = np.asarray([by_coord[c]["prediction"] for c in coords], dtype=np.float32)
    assert_close(got, expected, atol=1e-5, rtol=1e-5)

    assert sample(text, "streamer_events_in_total") == n
    assert sample(text, "streamer_predictions_out_total") == n
    assert sample(text, "streamer_end_to_end_latency_seconds_count") == n
    assert sample(text, "streamer_batch_events_sum") == n
    assert sample(text, "streamer_model_info", 'version="v-test-1"') == 1
    assert sample(text, "streamer_keys_resident") == len(set(keys))
    assert sample(text, "streamer_commits_total") >= 1


def test_bad_messages_go_to_the_dlq_with_reasons_while_good_ones_flow(
    topics: Topics, artifact_dir: Path
) -> None:
    now = time.time()
    good = [(b"a", json.dumps({"key": "a", "ts": now, "values": [1, 2, 3, 4]}).encode())]
    bad = {
        "not_json": (b"a", b"{nope"),
        "not_utf8": (b"a", b"\xff\xfe\x00"),
        "schema": (b"a", json.dumps({"key": "a", "ts": now, "values": "x"}).encode()),
        "non_finite": (b"a", b'{"key": "a", "ts": 1, "values": [1, NaN, 3, 4]}'),
        "feature_count": (b"a", json.dumps({"key": "a", "ts": now, "values": [1]}).encode()),
        "key_mismatch": (b"b", json.dumps({"key": "a", "ts": now, "values": [1, 2, 3, 4]})
                         .encode()),
        "future_timestamp": (b"a", json.dumps({"ts": now + 86400, "values": [1, 2, 3, 4]})
                             .encode()),
        "missing_key": (None, json.dumps({"ts": now, "values": [1, 2, 3, 4]}).encode()),
    }
    records = good + list(bad.values()) + good
    with running_service(settings_for(topics, artifact_dir)) as service:
        coords = produce(topics.bootstrap, topics.input, records)
        dlq = read_topic(topics.bootstrap, topics.dlq, expect=len(bad))
        out = json_values(read_topic(topics.bootstrap, topics.output, expect=2))
        _, text = scrape(service.http.port)

    assert len(out) == 2 and {(o["partition"], o["offset"]) for o in out} == {
        coords[0], coords[-1]
    }
    assert len(dlq) == len(bad)
    reasons = {}
    for rec in dlq:
        headers = {k: v.decode() for k, v in rec.headers}
        reasons[headers["dlq.reason"]] = rec
        assert headers["dlq.source.topic"] == topics.input
        src = (int(headers["dlq.source.partition"]), int(headers["dlq.source.offset"]))
        assert src in coords
        assert headers["dlq.detail"]
    assert set(reasons) == set(bad)
    for reason, (key, value) in bad.items():
        assert reasons[reason].value == value and reasons[reason].key == key
        assert sample(text, "streamer_dead_letter_total", f'reason="{reason}"') == 1


def test_health_and_readiness_over_http(topics: Topics, artifact_dir: Path) -> None:
    with running_service(settings_for(topics, artifact_dir)) as service:
        port = service.http.port
        deadline = time.monotonic() + 15
        while scrape(port, "/readyz")[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert scrape(port, "/readyz")[0] == 200
        assert scrape(port, "/healthz")[0] == 200
        _, text = scrape(port)
        assert sample(text, "streamer_ready") == 1
        assert sample(text, "streamer_assigned_partitions") == 4

"""End-to-end scenario bodies shared by every Kafka the tests run against.

Each function takes the topics and a model artifact and drives the real service (on a thread,
or as the ``streamer run`` process) through real Kafka clients; only the cluster behind
``topics.bootstrap`` differs between the embedded-broker and the Apache Kafka runs.

    one_prediction_per_offset(topics, artifact_dir, n=400)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from torch.testing import assert_close

from streamer.artifact import load_artifact

from ..kafka_helpers import Topics, json_values, produce, read_topic
from ..reference import reference_predictions
from ..streamer.service_helpers import running_service, sample, scrape, settings_for

Record = tuple[bytes | None, bytes | None]


def generic_events(n: int, n_keys: int, seed: int = 0) -> tuple[list[str], np.ndarray, list]:
    """Keys, [n, 4] values and strictly increasing recent timestamps (seconds)."""
    rng = np.random.default_rng(seed)
    keys = [f"key-{int(k)}" for k in rng.integers(0, n_keys, size=n)]
    values = rng.normal(size=(n, 4)).round(6)
    now = time.time()
    ts = [round(now - 5 + i * 1e-3, 6) for i in range(n)]
    return keys, values, ts


def encode(keys: list[str], values: np.ndarray, ts: list) -> list[Record]:
    return [
        (k.encode(), json.dumps({"key": k, "ts": t, "values": v.tolist()}).encode())
        for k, v, t in zip(keys, values, ts, strict=True)
    ]


def wait_for_sample(port: int, name: str, at_least: float, timeout_s: float = 10) -> str:
    """The scrape once ``name`` reaches ``at_least``: histograms are observed after the ack."""
    deadline = time.monotonic() + timeout_s
    while True:
        _, text = scrape(port)
        if sample(text, name) >= at_least or time.monotonic() >= deadline:
            return text
        time.sleep(0.05)


def one_prediction_per_offset(topics: Topics, artifact_dir: Path, n: int,
                              client: str = "kafka-python") -> None:
    """Every input offset gets exactly one prediction, equal to the offline reference."""
    keys, values, ts = generic_events(n, n_keys=max(2, n // 25))
    with running_service(settings_for(topics, artifact_dir, kafka_client=client)) as service:
        coords = produce(topics.bootstrap, topics.input, encode(keys, values, ts))
        out = json_values(read_topic(topics.bootstrap, topics.output, expect=n))
        text = wait_for_sample(service.http.port, "streamer_end_to_end_latency_seconds_count", n)

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


def bad_records(now: float) -> dict[str, Record]:
    """One poison message per dead-letter reason, keyed by the reason the service must give."""
    def value(**payload: object) -> bytes:
        return json.dumps(payload).encode()

    return {
        "not_json": (b"a", b"{nope"),
        "not_utf8": (b"a", b"\xff\xfe\x00"),
        "schema": (b"a", value(key="a", ts=now, values="x")),
        "non_finite": (b"a", b'{"key": "a", "ts": 1, "values": [1, NaN, 3, 4]}'),
        "feature_count": (b"a", value(key="a", ts=now, values=[1])),
        "key_mismatch": (b"b", value(key="a", ts=now, values=[1, 2, 3, 4])),
        "future_timestamp": (b"a", value(ts=now + 86400, values=[1, 2, 3, 4])),
        "missing_key": (None, value(ts=now, values=[1, 2, 3, 4])),
    }


def dead_letters_with_reasons(topics: Topics, artifact_dir: Path,
                              client: str = "kafka-python") -> None:
    """Poison messages go to the DLQ unchanged, with reason headers; good ones still flow."""
    now = time.time()
    good: Record = (b"a", json.dumps({"key": "a", "ts": now, "values": [1, 2, 3, 4]}).encode())
    bad = bad_records(now)
    records = [good, *bad.values(), good]
    with running_service(settings_for(topics, artifact_dir, kafka_client=client)) as service:
        coords = produce(topics.bootstrap, topics.input, records)
        dlq = read_topic(topics.bootstrap, topics.dlq, expect=len(bad))
        out = json_values(read_topic(topics.bootstrap, topics.output, expect=2))
        _, text = scrape(service.http.port)

    assert len(out) == 2
    assert {(o["partition"], o["offset"]) for o in out} == {coords[0], coords[-1]}
    assert len(dlq) == len(bad), "one dead letter per bad message, no duplicates"
    by_reason = {}
    for rec in dlq:
        headers = {k: v.decode() for k, v in rec.headers}
        by_reason[headers["dlq.reason"]] = rec
        assert headers["dlq.source.topic"] == topics.input
        src = (int(headers["dlq.source.partition"]), int(headers["dlq.source.offset"]))
        assert src in coords[1:-1]
        assert headers["dlq.detail"]
    assert set(by_reason) == set(bad)
    for reason, (key, value) in bad.items():
        assert by_reason[reason].value == value and by_reason[reason].key == key
        assert sample(text, "streamer_dead_letter_total", f'reason="{reason}"') == 1


def streamer_process(topics: Topics, artifact_dir: Path, group: str,
                     client: str = "kafka-python") -> subprocess.Popen[str]:
    """``streamer run`` as an operator starts it: flags and env vars, its own process."""
    return subprocess.Popen(
        [sys.executable, "-m", "streamer.cli", "run", "--bootstrap-servers", topics.bootstrap,
         "--input-topic", topics.input, "--output-topic", topics.output, "--group-id", group,
         "--model", str(artifact_dir), "--metrics-address", "127.0.0.1:0",
         "--max-batch-events", "50", "--kafka-client", client],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "STREAMER_DEVICE": "cpu", "STREAMER_DLQ_TOPIC": topics.dlq},
    )


def sigterm_mid_stream_then_successor(topics: Topics, artifact_dir: Path, n: int,
                                      client: str = "kafka-python") -> None:
    """SIGTERM while events arrive: the process drains, commits what it emitted and exits 0;
    a successor in the same group finishes. Nothing lost, nothing predicted twice.

    Three phases make "mid-stream" hold by construction: a backlog before the process starts,
    a live feed during which SIGTERM is sent, and a tail produced only after it has exited.
    """
    now = time.time()
    records: list[Record] = [
        (f"k{i % 37}".encode(),
         json.dumps({"ts": now + i * 1e-4, "values": [i % 7, 1.0, -1.0, 0.5]}).encode())
        for i in range(n)
    ]
    live_from, tail_from = n // 3, 2 * n // 3
    coords = produce(topics.bootstrap, topics.input, records[:live_from])
    group = f"sigterm-{topics.input}"
    proc = streamer_process(topics, artifact_dir, group, client)
    try:
        if not read_topic(topics.bootstrap, topics.output, expect=1, timeout_s=60, settle_s=0):
            proc.kill()
            raise AssertionError(f"the process never started predicting:\n{proc.communicate()[0]}")
        feeding = threading.Event()
        live: list[tuple[int, int]] = []

        def feed() -> None:
            for lo in range(live_from, tail_from, 50):
                chunk = records[lo:min(lo + 50, tail_from)]
                live.extend(produce(topics.bootstrap, topics.input, chunk))
                feeding.set()
                time.sleep(0.02)

        feeder = threading.Thread(target=feed, name="live-feed")
        feeder.start()
        assert feeding.wait(30), "the live feed never produced"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        feeder.join(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out
    assert "received SIGTERM, draining" in out and "stopped cleanly" in out, out
    coords += live + produce(topics.bootstrap, topics.input, records[tail_from:])

    with running_service(settings_for(topics, artifact_dir, group_id=group,
                                      kafka_client=client)):
        outputs = read_topic(topics.bootstrap, topics.output, expect=n, timeout_s=90)
    seen = [(o["partition"], o["offset"]) for o in json_values(outputs)]
    assert len(coords) == n
    missing = set(coords) - set(seen)
    assert not missing, f"{len(missing)} input offsets have no prediction"
    assert len(seen) == n, "a graceful stop commits exactly what was emitted: no duplicates"

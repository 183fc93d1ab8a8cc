"""The demo's Kafka clients against the embedded broker: real producer, real consumer."""

from __future__ import annotations

import json
import threading
import time

from streamer.demo_clients import PredictionWatcher, send_in_turn

from ..kafka_helpers import Topics, produce, read_topic


def _prediction(version: str, i: int) -> tuple[bytes, bytes]:
    return b"k", json.dumps({"key": "k", "prediction": [i], "model_version": version}).encode()


def test_watcher_keeps_the_last_few_and_every_version(topics: Topics) -> None:
    watcher = PredictionWatcher(topics.bootstrap, topics.output, keep=3)
    try:
        # It reads from the log end, so send until its first poll has picked one up.
        deadline = time.monotonic() + 30
        while not watcher.recent and time.monotonic() < deadline:
            produce(topics.bootstrap, topics.output, [_prediction("v1", 0)])
            time.sleep(0.2)
        assert watcher.recent, "the watcher never saw a prediction"
        produce(topics.bootstrap, topics.output, [_prediction("v2", i) for i in range(1, 8)])
        deadline = time.monotonic() + 30
        while watcher.recent[-1]["prediction"] != [7] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [p["prediction"] for p in watcher.recent] == [[5], [6], [7]]
        assert watcher.versions == {"v1", "v2"}
    finally:
        watcher.stop()


def test_send_in_turn_cycles_until_stopped(topics: Topics) -> None:
    values = (b"a", b"b", b"c")
    stop = threading.Event()
    sent: list[int] = []
    thread = threading.Thread(
        target=lambda: sent.append(
            send_in_turn(topics.bootstrap, topics.dlq, b"key", values, stop, interval_s=0.05)
        )
    )
    thread.start()
    try:
        assert len(read_topic(topics.bootstrap, topics.dlq, expect=5, settle_s=0)) >= 5
    finally:
        stop.set()
        thread.join(15)
    records = read_topic(topics.bootstrap, topics.dlq, expect=sent[0], settle_s=0.3)
    assert len(records) == sent[0]
    assert [r.value for r in records] == [values[i % 3] for i in range(sent[0])]
    assert {r.key for r in records} == {b"key"}

"""The demo's own Kafka clients, kept apart from its console so that ``streamer.demo`` knows
neither Kafka nor Prometheus (only the composition root, ``streamer.service``, knows both).

``PredictionWatcher`` reads the predictions topic as a downstream consumer would (its own
consumer group, from the log end); ``send_in_turn`` mixes messages into a topic at a fixed
pace, which the demo uses to show the dead-letter path.

    watcher = PredictionWatcher("127.0.0.1:9092", "predictions")
    ...                  # watcher.recent: the last few predictions; watcher.versions: all seen
    watcher.stop()
"""

from __future__ import annotations

import json
import threading
from collections import deque
from collections.abc import Sequence
from typing import Any

from kafka import KafkaConsumer, KafkaProducer


def send_in_turn(
    bootstrap: str, topic: str, key: bytes, values: Sequence[bytes], stop: threading.Event,
    interval_s: float = 2.0,
) -> int:
    """Produce ``values`` one at a time, in turn, every ``interval_s`` seconds until ``stop``.

    Returns how many were sent; the producer is flushed and closed (bounded: 5 s) before that.
    """
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    sent = 0
    try:
        while not stop.wait(interval_s):
            producer.send(topic, key=key, value=values[sent % len(values)])
            sent += 1
    finally:
        producer.close(timeout=5)
    return sent


class PredictionWatcher:
    """Reads a predictions topic on a background thread; keeps the last few and every
    ``model_version`` seen (JSON values as the service writes them)."""

    def __init__(self, bootstrap: str, topic: str, keep: int = 5) -> None:
        self.recent: deque[dict[str, Any]] = deque(maxlen=keep)
        self.versions: set[str] = set()
        self._keep = keep
        self._stop = threading.Event()
        self._consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap,
                                       auto_offset_reset="latest", fetch_max_wait_ms=50,
                                       group_id="demo-viewer")
        self._thread = threading.Thread(target=self._run, name="demo-viewer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for batch in self._consumer.poll(timeout_ms=200, max_records=500).values():
                for rec in batch[-self._keep:]:
                    self.recent.append(json.loads(rec.value))
                for rec in batch:
                    self.versions.add(json.loads(rec.value)["model_version"])
        self._consumer.close()

    def stop(self) -> None:
        """Stop reading and close the consumer (bounded: waits at most 5 s)."""
        self._stop.set()
        self._thread.join(timeout=5)

"""Small real-client helpers for integration tests: produce inputs, read topics back."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition


@dataclass(frozen=True)
class Topics:
    bootstrap: str
    input: str
    output: str
    dlq: str


def produce(
    bootstrap: str, topic: str, records: list[tuple[bytes | None, bytes | None]]
) -> list[tuple[int, int]]:
    """Send (key, value) records in order; returns each record's (partition, offset)."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=2,
                             max_in_flight_requests_per_connection=1)
    futures = [producer.send(topic, key=k, value=v) for k, v in records]
    producer.flush()
    out = []
    for f in futures:
        meta = f.get(timeout=10)
        out.append((meta.partition, meta.offset))
    producer.close()
    return out


def read_topic(
    bootstrap: str, topic: str, expect: int, timeout_s: float = 60.0, settle_s: float = 0.5
) -> list[Any]:
    """Every record of ``topic`` from the beginning: waits for ``expect`` records, then
    ``settle_s`` more to catch duplicates that should not be there."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                             enable_auto_commit=False, fetch_max_wait_ms=10, check_crcs=False)
    parts = consumer.partitions_for_topic(topic) or set()
    consumer.assign([TopicPartition(topic, p) for p in parts])
    consumer.seek_to_beginning()
    records: list[Any] = []
    deadline = time.monotonic() + timeout_s
    settle_until: float | None = None
    while time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=100).values():
            records.extend(batch)
        if len(records) >= expect and settle_until is None:
            settle_until = time.monotonic() + settle_s
        if settle_until is not None and time.monotonic() >= settle_until:
            break
    consumer.close()
    return records


def json_values(records: list[Any]) -> list[dict[str, Any]]:
    return [json.loads(r.value) for r in records]

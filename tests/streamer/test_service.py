"""The service through the embedded broker: real Kafka clients, real HTTP.

The end-to-end contract (one prediction per offset equal to the reference, the DLQ, SIGTERM)
lives in tests/e2e/scenarios.py and runs there against the embedded broker and Apache Kafka."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..kafka_helpers import Topics, produce, read_topic
from .service_helpers import running_service, sample, scrape, settings_for


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


def test_consumer_lag_is_measured_per_partition(topics: Topics, artifact_dir: Path) -> None:
    now = time.time()
    records = [(f"k{i}".encode(),
                json.dumps({"ts": now, "values": [i, 0, 0, 0]}).encode()) for i in range(40)]
    with running_service(settings_for(topics, artifact_dir)) as service:
        coords = produce(topics.bootstrap, topics.input, records)
        assert len(read_topic(topics.bootstrap, topics.output, expect=40, settle_s=0)) == 40
        lags: dict[int, float] = {}
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            text = scrape(service.http.port)[1]
            lags = {p: _lag(text, topics.input, p) for p in range(4)}
            if all(v == 0.0 for v in lags.values()):
                break
            time.sleep(0.1)
    assert {p for p, _ in coords} == set(range(4))
    assert lags == {0: 0.0, 1: 0.0, 2: 0.0, 3: 0.0}, "caught up on every partition"


def _lag(text: str, topic: str, partition: int) -> float:
    try:
        return sample(text, "streamer_consumer_lag_messages",
                      f'partition="{partition}",topic="{topic}"')
    except KeyError:  # not measured yet
        return -1.0


def test_lag_counts_records_produced_since_the_last_fetch(
    topics: Topics, artifact_dir: Path
) -> None:
    """Lag is measured against the log end now, not the high watermark the last fetch saw
    (which reads 0 for a consumer that has just caught up while more arrive)."""
    from streamer.errors import KafkaUnavailable
    from streamer.kafka_edge import KafkaEdge

    settings = settings_for(topics, artifact_dir, group_id=f"lag-{topics.input}")
    edge = KafkaEdge(settings, lambda parts: None, lambda parts: None)
    try:
        now = time.time()
        first = [(b"k%d" % i, json.dumps({"ts": now, "values": [i]}).encode()) for i in range(20)]
        produce(topics.bootstrap, topics.input, first)
        got = 0
        deadline = time.monotonic() + 30
        while got < 20 and time.monotonic() < deadline:
            try:
                batch = edge.poll()
            except KafkaUnavailable:  # still looking for the group coordinator
                continue
            got += len(batch)
            if batch:
                edge.flush_and_commit(batch)
        assert got == 20
        later = produce(topics.bootstrap, topics.input, first[:12])
        expected = {(topics.input, p): 0.0 for p in range(4)}
        for p, _ in later:
            expected[(topics.input, p)] += 1
        assert edge.lag() == expected
    finally:
        edge.close()

"""Offsets the broker deleted before we read them are counted and logged, never silent."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest

from streamer.broker import EmbeddedBroker

from ..kafka_helpers import Topics, produce, read_topic
from .service_helpers import running_service, sample, scrape, settings_for


def _records(lo: int, hi: int, pad: int = 0) -> list[tuple[bytes, bytes]]:
    now = time.time()
    return [(b"k", json.dumps({"ts": now, "values": [i, 0, 0, 0], "pad": "x" * pad}).encode())
            for i in range(lo, hi)]


def _skipped(port: int) -> float:
    try:
        return sample(scrape(port)[1], "streamer_offsets_skipped_total", 'partition="0"')
    except KeyError:  # no series until the first gap
        return 0.0


def test_offsets_lost_to_retention_are_counted_loudly(
    broker: EmbeddedBroker, artifact_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    topics = Topics(broker.bootstrap_servers, "small", "small.out", "small.dlq")
    for name in (topics.input, topics.output, topics.dlq):
        broker.create_topic(name, partitions=1)
    settings = settings_for(topics, artifact_dir, group_id="lagging", session_timeout_ms=3000,
                            heartbeat_interval_ms=1000)  # the successor waits this out
    with running_service(settings):
        produce(topics.bootstrap, topics.input, _records(0, 10))
        assert len(read_topic(topics.bootstrap, topics.output, expect=10, settle_s=0.3)) == 10
    # While the consumer is away, more than the broker's 5 MiB per partition arrives.
    produce(topics.bootstrap, topics.input, _records(10, 150, pad=60_000))
    caplog.set_level(logging.WARNING, logger="streamer.kafka_edge")
    with running_service(settings) as service:
        deadline = time.monotonic() + 30
        while _skipped(service.http.port) == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        skipped = _skipped(service.http.port)
    assert 0 < skipped < 140
    assert any("SKIPPED" in r.getMessage() for r in caplog.records)



def test_transaction_markers_are_not_counted_as_lost(
    topics: Topics, artifact_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Each committed transaction leaves a marker offset no consumer sees: a gap that lost
    nothing, so it is neither counted nor logged as SKIPPED (the log start never moved).

    The embedded broker does not report aborted transactions in fetch responses, so whether
    read_committed hides aborted records is the broker's and client's part, not tested here;
    that the setting reaches the consumer is."""
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": topics.bootstrap,
                         "transactional.id": f"tx-{topics.input}"})
    producer.init_transactions(30)
    now = time.time()
    for txn in ("a", "b", "c"):
        producer.begin_transaction()
        for i in range(5):
            value = json.dumps({"ts": now, "values": [i, 0, 0, 0]}).encode()
            producer.produce(topics.input, key=f"{txn}{i}".encode(), value=value, partition=0)
        producer.commit_transaction(30)
    del producer
    # Batches of 5 put each marker at a batch boundary, where gaps are checked.
    # The embedded broker writes transaction markers without a CRC: skip the check there.
    settings = settings_for(topics, artifact_dir, isolation_level="read_committed",
                            check_crcs=False, max_batch_events=5)
    caplog.set_level(logging.WARNING, logger="streamer.kafka_edge")
    with running_service(settings) as service:
        outputs = read_topic(topics.bootstrap, topics.output, expect=15, settle_s=1.0)
        skipped = _skipped(service.http.port)
        assert service.edge is not None
        assert service.edge.consumer.config["isolation_level"] == "read_committed"
    offsets = sorted(json.loads(r.value)["offset"] for r in outputs)
    assert len(offsets) == 15 and offsets[-1] > 15, "three markers sit between the records"
    assert skipped == 0
    assert not any("SKIPPED" in r.getMessage() for r in caplog.records)

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
    settings = settings_for(topics, artifact_dir, group_id="lagging")
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

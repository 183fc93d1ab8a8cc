"""The service through the embedded broker: real Kafka clients, real HTTP.

The end-to-end contract (one prediction per offset equal to the reference, the DLQ, SIGTERM)
lives in tests/e2e/scenarios.py and runs there against the embedded broker and Apache Kafka."""

from __future__ import annotations

import time
from pathlib import Path

from ..kafka_helpers import Topics
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

"""Fixtures that start real things: the embedded Kafka broker and model artifacts on disk."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from streamer.broker import EmbeddedBroker

from .kafka_helpers import Topics


@pytest.fixture
def broker() -> Iterator[EmbeddedBroker]:
    """A fresh mock Kafka cluster on loopback for one test (starts in milliseconds)."""
    with EmbeddedBroker() as b:
        yield b


@pytest.fixture(params=["kafka-python", "confluent"])
def kafka_client(request: pytest.FixtureRequest) -> str:
    """The Kafka client of the service under test: each test that takes it runs with both."""
    return str(request.param)


@pytest.fixture
def topics(broker: EmbeddedBroker) -> Topics:
    """Input (4 partitions), output and dead-letter topics with names unique to the test."""
    name = f"events-{uuid.uuid4().hex[:8]}"
    t = Topics(broker.bootstrap_servers, name, f"{name}.out", f"{name}.dlq")
    broker.create_topic(t.input, partitions=4)
    broker.create_topic(t.output, partitions=4)
    broker.create_topic(t.dlq, partitions=1)
    return t


@pytest.fixture
def artifact_dir(tmp_path: Path) -> Path:
    """A small seeded generic model (F=4, H=16, L=2) saved as a real artifact."""
    from streamer.artifact import save_artifact

    from .streamer.conftest import make_model

    path = tmp_path / "model"
    save_artifact(path, make_model(seed=7), version="v-test-1")
    return path

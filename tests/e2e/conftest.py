"""The one thing that differs between the end-to-end variants: which Kafka the test talks to.

``kafka_cluster`` is parametrized: ``embedded`` (the librdkafka mock, starts in milliseconds,
runs everywhere) and ``apache-kafka`` (the official image via testcontainers, one container for
the whole session, skipped where no Docker engine answers). Both offer the same two things a
scenario needs: ``bootstrap_servers`` and ``create_topic(name, partitions)``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Protocol

import pytest
from kafka import KafkaConsumer
from kafka.admin import KafkaAdminClient, NewTopic

from streamer.broker import EmbeddedBroker

from ..kafka_helpers import Topics


class KafkaCluster(Protocol):
    bootstrap_servers: str

    def create_topic(self, name: str, partitions: int) -> None: ...


class EmbeddedCluster:
    """The mock cluster has no CreateTopics API; topics are made through its C interface."""

    def __init__(self, broker: EmbeddedBroker) -> None:
        self.broker = broker
        self.bootstrap_servers = broker.bootstrap_servers

    def create_topic(self, name: str, partitions: int) -> None:
        self.broker.create_topic(name, partitions=partitions)


class AdminCluster:
    """A real cluster: topics are made with the admin API, as an operator's tooling would."""

    def __init__(self, bootstrap_servers: str) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers,
                                      request_timeout_ms=30000)

    def create_topic(self, name: str, partitions: int) -> None:
        self.admin.create_topics(
            [NewTopic(name, num_partitions=partitions, replication_factor=1)], timeout_ms=30000
        )
        wait_for_partitions(self.bootstrap_servers, name, partitions)

    def close(self) -> None:
        self.admin.close()


def wait_for_partitions(bootstrap: str, topic: str, partitions: int, timeout_s: float = 30) -> None:
    """Block until client metadata lists every partition of a new topic.

    CreateTopics returns once the controller has the topic; a client that asks a broker for
    metadata a moment later can still miss it, and read_topic would then assign nothing.
    """
    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            # None means "unknown topic": the next call asks the cluster again.
            if len(consumer.partitions_for_topic(topic) or ()) == partitions:
                return
            time.sleep(0.1)
    finally:
        consumer.close()
    raise TimeoutError(f"topic {topic} did not show {partitions} partitions in {timeout_s} s")


@pytest.fixture(scope="session")
def apache_kafka_bootstrap() -> Iterator[str]:
    """One apache/kafka container for the session: starting Kafka takes seconds, a topic not."""
    from .apache_kafka import ApacheKafkaContainer, docker_unavailable_reason

    reason = docker_unavailable_reason()
    if reason is not None:
        pytest.skip(f"real Apache Kafka via testcontainers needs Docker; {reason}")
    with ApacheKafkaContainer() as kafka:
        yield kafka.get_bootstrap_server()


@pytest.fixture(
    params=["embedded", pytest.param("apache-kafka", marks=pytest.mark.docker)],
)
def kafka_cluster(request: pytest.FixtureRequest) -> Iterator[KafkaCluster]:
    if request.param == "embedded":
        with EmbeddedBroker() as broker:
            yield EmbeddedCluster(broker)
        return
    cluster = AdminCluster(request.getfixturevalue("apache_kafka_bootstrap"))
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def cluster_topics(kafka_cluster: KafkaCluster) -> Topics:
    """Input (4 partitions), output (4) and dead-letter (1) topics unique to the test."""
    name = f"e2e-{uuid.uuid4().hex[:8]}"
    topics = Topics(kafka_cluster.bootstrap_servers, name, f"{name}.out", f"{name}.dlq")
    kafka_cluster.create_topic(topics.input, 4)
    kafka_cluster.create_topic(topics.output, 4)
    kafka_cluster.create_topic(topics.dlq, 1)
    return topics

"""The end-to-end contract against every Kafka in ``kafka_cluster``: the embedded broker here,
real Apache Kafka (testcontainers) wherever Docker answers. Bodies live in scenarios.py.

These are also the embedded-broker integration tests of tests/streamer (not repeated there).
Each runs with both Kafka clients of the edge (``kafka_client``: kafka-python, confluent).
"""

from __future__ import annotations

from pathlib import Path

from ..kafka_helpers import Topics
from . import scenarios


def test_one_prediction_per_input_offset(
    cluster_topics: Topics, artifact_dir: Path, kafka_client: str
) -> None:
    scenarios.one_prediction_per_offset(cluster_topics, artifact_dir, n=3000, client=kafka_client)


def test_bad_input_goes_to_the_dlq_with_reasons(
    cluster_topics: Topics, artifact_dir: Path, kafka_client: str
) -> None:
    scenarios.dead_letters_with_reasons(cluster_topics, artifact_dir, client=kafka_client)


def test_sigterm_mid_stream_then_successor_loses_nothing(
    cluster_topics: Topics, artifact_dir: Path, kafka_client: str
) -> None:
    scenarios.sigterm_mid_stream_then_successor(cluster_topics, artifact_dir, n=1500,
                                                client=kafka_client)

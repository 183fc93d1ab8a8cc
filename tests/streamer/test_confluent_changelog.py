"""The confluent edge's durable-state methods against the embedded broker: a checkpoint's
offsets are committed exactly (read back by another client), exactly-once commits the outputs
and the offsets in one transaction (its commit marker lands in the log), the restore read stops
at the end offsets read at its start (also when the log ends with a transaction marker), and a
seek made inside an assignment is where the partition is read from. The service-level
behaviour (restore equals an uninterrupted run, scale-out, crashes) runs with both clients in
test_recovery.py and tests/e2e/test_state_scaleout.py."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from streamer.broker import EmbeddedBroker
from streamer.confluent_edge import ConfluentEdge
from streamer.errors import KafkaUnavailable
from streamer.events import Message

from ..kafka_helpers import Topics
from .service_helpers import settings_for


def _settings(topics: Topics, **extra: Any) -> Any:
    return settings_for(topics, Path("."), kafka_client="confluent", changelog=True,
                        session_timeout_ms=3000, heartbeat_interval_ms=500,
                        request_timeout_ms=5000, **extra)


def _produce(topics: Topics, n: int, partition: int) -> None:
    producer = Producer({"bootstrap.servers": topics.bootstrap})
    for _ in range(n):
        producer.produce(topics.input, b"x", b"k", partition=partition)
    assert producer.flush(10) == 0


def _poll_until(edge: ConfluentEdge, n: int, timeout_s: float = 30) -> list[Message]:
    got: list[Message] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < n and time.monotonic() < deadline:
        got.extend(edge.poll())
    return got


def _committed(topics: Topics, group: str, partitions: list[int]) -> dict[int, int]:
    reader = Consumer({"bootstrap.servers": topics.bootstrap, "group.id": group})
    try:
        tps = reader.committed([TopicPartition(topics.input, p) for p in partitions], timeout=10)
    finally:
        reader.close()
    return {tp.partition: tp.offset for tp in tps}


def _watermarks(topics: Topics, topic: str, partition: int) -> tuple[int, int]:
    reader = Consumer({"bootstrap.servers": topics.bootstrap, "group.id": "wm"})
    try:
        low, high = reader.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
    finally:
        reader.close()
    return low, high


def test_seek_inside_the_assignment_starts_the_partition_there(
    broker: EmbeddedBroker, topics: Topics
) -> None:
    """What a restore does: seek each assigned partition to its marker's offset."""
    _produce(topics, 40, 1)
    edge: ConfluentEdge

    def assigned(partitions: set[int]) -> None:
        for p in partitions:
            edge.seek(p, 25)

    edge = ConfluentEdge(_settings(topics), assigned, lambda p: None)
    try:
        batch = _poll_until(edge, 15)
    finally:
        edge.close()
    assert [m.offset for m in batch if m.partition == 1] == list(range(25, 40))


def test_at_least_once_commit_offsets_commits_exactly_those(
    broker: EmbeddedBroker, topics: Topics
) -> None:
    _produce(topics, 10, 0)
    settings = _settings(topics)
    edge = ConfluentEdge(settings, lambda p: None, lambda p: None)
    try:
        _poll_until(edge, 10)
        assert edge.commit_offsets({0: 7}) is True
        assert _committed(topics, settings.group_id, [0])[0] == 7
    finally:
        edge.close()


def test_exactly_once_commits_outputs_changelog_and_offsets_in_one_transaction(
    broker: EmbeddedBroker, topics: Topics
) -> None:
    state = f"{topics.input}-state"
    broker.create_topic(state, partitions=4)
    _produce(topics, 10, 2)
    settings = _settings(topics, processing_guarantee="exactly_once", changelog_topic=state,
                         transactional_id=f"t-{topics.input}",
                         check_crcs=False)  # the embedded broker writes markers without CRC
    edge = ConfluentEdge(settings, lambda p: None, lambda p: None, changelog_topic=state)
    try:
        batch = _poll_until(edge, 10)
        for m in batch:
            edge.send(topics.output, m.key, b"prediction")
        edge.send_changelog(2, b"k", b"state")
        edge.flush()
        assert edge.commit_offsets({2: 10}) is True
        # The transaction's commit marker follows the records in each log it wrote. (The
        # embedded broker accepts TxnOffsetCommit but does not store the offsets: committed
        # offsets of exactly-once are checked on Apache Kafka only, by the e2e test.)
        assert _watermarks(topics, state, 2)[1] == 2  # the state record and the marker
        out = sum(_watermarks(topics, topics.output, p)[1] for p in range(4))
        outputs_in = sum(1 for p in range(4) if _watermarks(topics, topics.output, p)[1])
        assert out == len(batch) + outputs_in  # one commit marker per output partition written
        records = list(edge.read_changelog({2}))
        assert [(p, k, v) for p, k, v, _ in records] == [(2, b"k", b"state")]
        # The next checkpoint runs in the next transaction.
        edge.send_changelog(2, b"k", b"newer")
        edge.flush()
        assert edge.commit_offsets({2: 10}) is True
        assert [v for _, _, v, _ in edge.read_changelog({2})] == [b"state", b"newer"]
    finally:
        edge.close()


def test_read_changelog_stops_at_the_end_offsets_read_at_its_start(
    broker: EmbeddedBroker, topics: Topics
) -> None:
    state = f"{topics.input}-state"
    broker.create_topic(state, partitions=4)
    settings = _settings(topics, changelog_topic=state)
    edge = ConfluentEdge(settings, lambda p: None, lambda p: None, changelog_topic=state)
    try:
        for i in range(5):
            edge.send_changelog(3, f"k{i}".encode(), b"v", [("h", b"1")])
        edge.flush()
        reader = edge.read_changelog({0, 3})  # partition 0 is empty: nothing to wait for
        first = next(reader)
        edge.send_changelog(3, b"late", b"v")  # written after the end offsets were read
        edge.flush()
        rest = list(reader)
    finally:
        edge.close()
    keys = [k for _, k, _, _ in [first, *rest]]
    assert keys == [f"k{i}".encode() for i in range(5)]
    assert first[3] == [("h", b"1")]


@pytest.mark.parametrize("record", ["changelog", "output"])
def test_a_full_local_queue_waits_no_longer_than_the_drain_deadline_once_stopping(
    broker: EmbeddedBroker, topics: Topics, record: str
) -> None:
    """librdkafka's local queue is full (the broker is down, nothing is acknowledged): a send
    waits for room up to flush_timeout_s (60 s here), but a SIGTERM meanwhile cuts the wait to
    drain_timeout_s (1 s), for a changelog record as for an output record."""
    state = f"{topics.input}-state"
    broker.create_topic(state, partitions=4)
    stop = threading.Event()
    settings = _settings(topics, changelog_topic=state, flush_timeout_s=60.0,
                         drain_timeout_s=1.0)
    edge = ConfluentEdge(settings, lambda p: None, lambda p: None, stop=stop,
                         changelog_topic=state)
    try:
        broker.set_broker_down(1)
        filled = 0
        while True:  # fill the edge's own producer queue (librdkafka: 100,000 records)
            try:
                edge.producer.produce(topics.output, b"v", b"k")
            except BufferError:
                break
            filled += 1
            assert filled <= 1_000_000, "the local queue never filled"
        stopper = threading.Timer(0.5, stop.set)
        stopper.start()
        started = time.monotonic()
        with pytest.raises(KafkaUnavailable, match="local queue full"):
            if record == "changelog":
                edge.send_changelog(1, b"k", b"state")
            else:
                edge.send(topics.output, b"k", b"prediction")
        waited = time.monotonic() - started
        stopper.join()
        assert 0.5 <= waited < 15.0, waited  # from the stop: 1 s (slack for a loaded machine)
    finally:
        broker.set_broker_up(1)
        edge.close()

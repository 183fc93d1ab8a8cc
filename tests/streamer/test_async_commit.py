"""Both edges commit offsets asynchronously after each batch's acks. Proved on the embedded
broker, with each client: a process killed with SIGKILL while its outputs cannot be acknowledged has
committed no offset beyond an acknowledged output (and had committed everything acknowledged
before); failing asynchronous commits make the service not ready, saying why, until a commit
goes through again, even one made while no input comes."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from kafka import KafkaConsumer, TopicPartition

from streamer.broker import EmbeddedBroker

from ..kafka_helpers import Topics, produce, read_topic
from .service_helpers import run_topics, running_service, settings_for, streamer_process

pytestmark = pytest.mark.integration

INPUTS, OUTPUTS = 1, 2  # broker ids: inputs and the group coordinator / the outputs' leaders


def _records(n: int, start: int = 0) -> list[tuple[bytes | None, bytes | None]]:
    now = time.time()
    return [(f"k{i % 11}".encode(),
             json.dumps({"ts": now, "values": [i % 7, 1.0, 0.0, -1.0]}).encode())
            for i in range(start, start + n)]


def _committed(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int]:
    """The group's committed offset per partition (0 when none), read without joining it."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group,
                             enable_auto_commit=False)
    try:
        return {p: consumer.committed(TopicPartition(topic, p), timeout_ms=10_000) or 0
                for p in range(partitions)}
    finally:
        consumer.close(autocommit=False)


def _wait_for(cond: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"{what} not within {timeout_s:.0f} s"
        time.sleep(0.1)


def test_kill_9_leaves_no_offset_committed_beyond_an_acknowledged_output(
    artifact_dir: Path, kafka_client: str,
) -> None:
    with EmbeddedBroker(num_brokers=3) as broker:
        topics = name, out_topic, group = run_topics(broker, "k9")
        for p in range(2):
            broker.set_partition_leader(name, p, INPUTS)
            broker.set_partition_leader(out_topic, p, OUTPUTS)
        broker.set_partition_leader(f"{name}.dlq", 0, INPUTS)
        broker.set_group_coordinator(group, INPUTS)
        bs = broker.bootstrap_servers
        proc = streamer_process(bs, topics, artifact_dir, kafka_client,
                                "--max-batch-events", "20", "--flush-timeout-s", "60")
        try:
            first = produce(bs, name, _records(200))
            assert len(read_topic(bs, out_topic, expect=200, timeout_s=60, settle_s=0)) >= 200
            ends = {p: 1 + max(o for q, o in first if q == p) for p in range(2)}
            # Everything acknowledged gets committed, the last batch's offsets included.
            _wait_for(lambda: _committed(bs, group, name, 2) == ends, 30, "commit of the ends")

            broker.set_broker_down(OUTPUTS)  # from now on no output can be acknowledged
            produce(bs, name, _records(100, start=200))
            time.sleep(3.0)  # the service reads them and sends predictions that stay unacked
            assert _committed(bs, group, name, 2) == ends, "committed ahead of the acks"
            assert proc.poll() is None, proc.communicate()[0]
            proc.kill()  # SIGKILL: no drain, no last commit
            proc.communicate(timeout=30)
            broker.set_broker_up(OUTPUTS)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        committed = _committed(bs, group, name, 2)
        outputs = read_topic(bs, out_topic, expect=200, timeout_s=30, settle_s=1.0)
    acknowledged = {(r["partition"], r["offset"]) for r in map(json.loads,
                                                                (o.value for o in outputs))}
    assert committed == ends
    for p, offset in committed.items():
        unacked = [o for o in range(offset) if (p, o) not in acknowledged]
        assert not unacked, f"partition {p}: offsets {unacked[:5]}... committed, not predicted"


def test_failing_async_commits_make_the_service_not_ready_until_one_succeeds(
    topics: Topics, artifact_dir: Path, broker: EmbeddedBroker, kafka_client: str,
) -> None:
    settings = settings_for(topics, artifact_dir, kafka_client=kafka_client,
                            commit_timeout_s=2.0, max_batch_events=20)
    with running_service(settings) as service:
        _wait_for(service.health.ready, 30, "readiness")
        broker.push_request_errors("OffsetCommit", ["REQUEST_TIMED_OUT"] * 40)
        reasons: set[str] = set()
        deadline = time.monotonic() + 60
        sent = 0
        while "offset commits are timing out" not in reasons:
            assert time.monotonic() < deadline, f"readiness never said so: {reasons}"
            produce(topics.bootstrap, topics.input, _records(20, start=sent))
            sent += 20
            for _ in range(5):
                if not service.health.ready():
                    reasons.add(service.health.not_ready_reason())
                time.sleep(0.05)
        broker.clear_request_errors("OffsetCommit")
        # No more input: the pending offsets are committed while idle, and that success alone
        # makes the service ready again.
        _wait_for(service.health.ready, 60, "readiness after commits succeed again")
        _wait_for(lambda: sum(_committed(topics.bootstrap, settings.group_id, topics.input,
                                         4).values()) == sent, 30, "every offset committed")

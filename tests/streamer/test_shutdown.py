"""How the service ends. SIGTERM drains within ``drain_timeout_s`` even when the brokers are
unreachable, and the exit status tells the truth: non-zero, and no "stopped cleanly", when
outputs were still in flight. Transient Kafka errors never end it; misconfiguration does,
without claiming a clean stop."""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kafka import TopicPartition
from kafka.errors import (
    InvalidRequestError,
    KafkaTimeoutError,
    NoBrokersAvailable,
    TopicAuthorizationFailedError,
)

from streamer.broker import EmbeddedBroker
from streamer.errors import KafkaEdgeError, KafkaUnavailable
from streamer.kafka_edge import KafkaEdge
from streamer.service import Service

from ..kafka_helpers import Topics, produce, read_topic
from .service_helpers import run_topics, settings_for, streamer_process
from .test_cli import _streamer

pytestmark = pytest.mark.integration

DRAIN_S = 3.0


def _records(n: int) -> list[tuple[bytes | None, bytes | None]]:
    now = time.time()
    return [(f"k{i % 5}".encode(), json.dumps({"ts": now, "values": [i, 1, 0, -1]}).encode())
            for i in range(n)]


def test_sigterm_with_brokers_down_exits_nonzero_within_drain_timeout(
    artifact_dir: Path, kafka_client: str,
) -> None:
    with EmbeddedBroker(num_brokers=3) as broker:
        topics = name, out_topic, group = run_topics(broker, "s")
        # Inputs and the coordinator on broker 1, outputs on broker 2: with broker 2 down the
        # service still reads but its predictions cannot be acknowledged.
        for p in range(2):
            broker.set_partition_leader(name, p, 1)
            broker.set_partition_leader(out_topic, p, 2)
        broker.set_partition_leader(f"{name}.dlq", 0, 1)
        broker.set_group_coordinator(group, 1)
        proc = streamer_process(
            broker.bootstrap_servers, topics, artifact_dir, kafka_client,
            "--drain-timeout-s", str(DRAIN_S), "--session-timeout-ms", "3000",
            "--heartbeat-interval-ms", "500", "--request-timeout-ms", "6000",
        )
        try:
            produce(broker.bootstrap_servers, name, _records(10))
            assert len(read_topic(broker.bootstrap_servers, out_topic, expect=10,
                                  timeout_s=60, settle_s=0)) >= 10, "never predicted"
            broker.set_broker_down(2)
            produce(broker.bootstrap_servers, name, _records(20))
            time.sleep(2.0)  # the service reads them and waits for acks that cannot come
            broker.set_broker_down(1)
            broker.set_broker_down(3)
            proc.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            out, _ = proc.communicate(timeout=60)
            elapsed = time.monotonic() - sent
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 1, out
    assert "received SIGTERM, draining" in out, out
    assert "unacknowledged" in out or "not acknowledged" in out, out
    assert "stopped cleanly" not in out, out
    assert elapsed < DRAIN_S + 7, f"took {elapsed:.1f} s to stop:\n{out}"


@pytest.mark.parametrize("error", ["REBALANCE_IN_PROGRESS", "ILLEGAL_GENERATION"])
def test_sigterm_while_commits_are_rejected_retries_them_and_stops_cleanly(
    artifact_dir: Path, kafka_client: str, error: str,
) -> None:
    """SIGTERM while the coordinator answers OffsetCommit with REBALANCE_IN_PROGRESS (three
    times): the drain commits again until the deadline, so every offset is committed and the
    exit is clean. (Found by fresh-eyes testers: the confluent edge gave up after one try, and
    kafka-python dropped the offsets yet said "stopped cleanly".) With ILLEGAL_GENERATION the
    generation is gone: offsets not committed by then are re-delivered to the partitions' next
    owner, and the log says so, at the loss or at the exit."""
    from .test_async_commit import _committed

    with EmbeddedBroker(num_brokers=1) as broker:
        topics = name, out_topic, group = run_topics(broker, "r")
        bs = broker.bootstrap_servers
        proc = streamer_process(
            bs, topics, artifact_dir, kafka_client, "--drain-timeout-s", "15",
            "--session-timeout-ms", "3000", "--heartbeat-interval-ms", "500",
        )
        try:
            produce(bs, name, _records(10))
            assert len(read_topic(bs, out_topic, expect=10, timeout_s=60, settle_s=0)) >= 10
            broker.push_request_errors(
                "OffsetCommit", [error] * (3 if error == "REBALANCE_IN_PROGRESS" else 1))
            produce(bs, name, _records(6))
            assert len(read_topic(bs, out_topic, expect=16, timeout_s=60, settle_s=0)) >= 16
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        committed = _committed(bs, group, name, 2)
    assert ("stopped cleanly" in out) == (proc.returncode == 0), out
    if error == "REBALANCE_IN_PROGRESS":
        assert proc.returncode == 0, out
        assert sum(committed.values()) == 16, (committed, out)
    elif sum(committed.values()) < 16:
        assert "will be re-delivered" in out, (committed, out)


class _ScriptedConsumer:
    """A consumer whose ``poll()`` raises the scripted errors, then returns nothing."""

    def __init__(self, errors: list[Exception]) -> None:
        self.errors = errors
        self.polls = 0

    def subscribe(self, topics: list[str], listener: Any) -> None:
        listener.on_partitions_assigned([TopicPartition(topics[0], 0)])

    def poll(self, timeout_ms: int = 0, max_records: int = 500) -> dict[Any, Any]:
        self.polls += 1
        if self.errors:
            raise self.errors.pop(0)
        time.sleep(timeout_ms / 1000)
        return {}

    def assignment(self) -> set[TopicPartition]:
        return {TopicPartition("in", 0)}

    def position(self, tp: TopicPartition, timeout_ms: int | None = None) -> int:
        return 0

    def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: 0 for tp in tps}

    def close(self, autocommit: bool = False, timeout_ms: int | None = None) -> None:
        pass


class _IdleProducer:
    def flush(self, timeout: float | None = None) -> None:
        pass

    def close(self, timeout: float | None = None) -> None:
        pass


def _run_with(consumer: _ScriptedConsumer, artifact_dir: Path,
              stop_after: Callable[[Service], bool]) -> Service:
    topics = Topics("unused:9092", "in", "out", "in.dlq")
    settings = settings_for(topics, artifact_dir, retry_backoff_max_s=0.2)
    service = Service.from_settings(settings)
    stop = threading.Event()
    edge = KafkaEdge(settings, service._on_assign, service._on_revoke, service._on_gap,
                     consumer=consumer, producer=_IdleProducer(),  # type: ignore[arg-type]
                     stop=stop)

    def watch() -> None:
        deadline = time.monotonic() + 20
        while not stop_after(service) and time.monotonic() < deadline:
            time.sleep(0.01)
        stop.set()

    threading.Thread(target=watch, daemon=True).start()
    service.run(stop, edge=edge)
    return service


def test_transient_poll_errors_are_retried_and_reported_not_ready(
    artifact_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    consumer = _ScriptedConsumer([NoBrokersAvailable(), KafkaTimeoutError(),
                                  InvalidRequestError("SyncGroup refused")])
    reasons: list[str] = []
    ready_again: list[bool] = []

    def recovered(service: Service) -> bool:
        reasons.append(service.health.not_ready_reason())
        if consumer.polls > 5 and service.health.ready():
            ready_again.append(True)
            return True
        return False

    caplog.set_level(logging.INFO, logger="streamer.service")
    service = _run_with(consumer, artifact_dir, recovered)
    assert consumer.polls > 5, "the loop kept polling after the errors"
    assert ready_again, "never ready again after the retries"
    assert any(r.startswith("Kafka unavailable") for r in reasons), set(reasons)
    assert service.metrics.kafka_retries._value.get() == 3
    assert any("stopped cleanly" in r.getMessage() for r in caplog.records)


def test_misconfiguration_ends_the_loop_without_stopped_cleanly(
    artifact_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    consumer = _ScriptedConsumer([TopicAuthorizationFailedError("events")])
    caplog.set_level(logging.INFO, logger="streamer.service")
    with pytest.raises(KafkaEdgeError) as err:
        _run_with(consumer, artifact_dir, lambda service: False)
    assert not isinstance(err.value, KafkaUnavailable)
    messages = [r.getMessage() for r in caplog.records]
    assert any("stopped after an error" in m for m in messages), messages
    assert not any("stopped cleanly" in m for m in messages), messages


def test_a_service_started_before_its_brokers_waits_for_them(
    artifact_dir: Path, kafka_client: str,
) -> None:
    """Compose and Kubernetes start the streamer and Kafka together: a streamer that finds no
    broker at start retries with backoff (not ready, saying why) and serves once they answer."""
    with EmbeddedBroker(num_brokers=1) as broker:
        name = f"s-{uuid.uuid4().hex[:8]}"
        for topic in (name, f"{name}.out", f"{name}.dlq"):
            broker.create_topic(topic, partitions=1)
        broker.set_broker_down(1)
        proc = _streamer(
            "run", "--bootstrap-servers", broker.bootstrap_servers, "--input-topic", name,
            "--output-topic", f"{name}.out", "--group-id", f"g-{name}", "--model",
            str(artifact_dir), "--device", "cpu", "--metrics-address", "127.0.0.1:0",
            "--retry-backoff-max-s", "0.5", "--kafka-client", kafka_client,
        )
        lines: list[str] = []
        retrying = threading.Event()

        def read_output() -> None:  # the process's log, line by line, as it comes
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line)
                if "cannot reach Kafka yet" in line:
                    retrying.set()

        reader = threading.Thread(target=read_output, daemon=True)
        reader.start()
        try:
            if kafka_client == "kafka-python":  # the broker stays down until it has retried
                assert retrying.wait(60), "".join(lines)
            time.sleep(2.0)
            assert proc.poll() is None, "the streamer gave up before Kafka came up"
            broker.set_broker_up(1)
            produce(broker.bootstrap_servers, name, _records(5))
            out_records = read_topic(broker.bootstrap_servers, f"{name}.out", expect=5,
                                     timeout_s=60, settle_s=0)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            reader.join(timeout=10)
    out = "".join(lines)
    assert len(out_records) == 5
    assert proc.returncode == 0, out
    if kafka_client == "kafka-python":  # librdkafka waits for brokers inside its own client
        assert "cannot reach Kafka yet" in out, out
    assert "stopped cleanly" in out, out

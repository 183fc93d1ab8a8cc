"""The confluent-kafka edge through the embedded broker's real group coordinator: a second
member joins and the first leaves while events flow (incremental cooperative rebalancing), and
still every input offset gets exactly one prediction. The scenarios shared with kafka-python
(one prediction per offset, DLQ, SIGTERM) run with both clients in tests/e2e."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from streamer.confluent_changelog import transactional_config
from streamer.confluent_edge import librdkafka_config
from streamer.errors import ConfigError
from streamer.kafka_edge import KafkaEdge

from ..kafka_helpers import Topics, json_values, read_topic
from .service_helpers import running_service, settings_for


def _records(lo: int, hi: int) -> list[tuple[bytes | None, bytes | None]]:
    now = time.time()
    return [(f"k{i % 29}".encode(),
             json.dumps({"ts": now + i * 1e-4, "values": [i % 5, 1.0, 0.0, -1.0]}).encode())
            for i in range(lo, hi)]


def _wait(cond: object, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond() and time.monotonic() < deadline:  # type: ignore[operator]
        time.sleep(0.05)
    assert cond(), "condition not met in time"  # type: ignore[operator]


def test_members_join_and_leave_mid_stream_one_prediction_per_offset(
    topics: Topics, artifact_dir: Path
) -> None:
    settings = settings_for(topics, artifact_dir, kafka_client="confluent",
                            group_id=f"coop-{topics.input}", max_batch_events=64,
                            session_timeout_ms=3000, heartbeat_interval_ms=500)
    n, coords = 3000, []
    producer = Producer({"bootstrap.servers": topics.bootstrap, "linger.ms": 2})

    def delivered(err: object, msg: Any) -> None:
        assert err is None, err
        coords.append((msg.partition(), msg.offset()))

    def feed(lo: int, hi: int) -> None:
        for start in range(lo, hi, 100):
            for key, value in _records(start, start + 100):
                producer.produce(topics.input, value, key, on_delivery=delivered)
            assert producer.flush(30) == 0
            time.sleep(0.02)

    with running_service(settings) as first:
        _wait(lambda: first._assigned == {0, 1, 2, 3}, 90)
        feed(0, 1000)
        with running_service(settings) as second:  # joins: partitions move while events flow
            feeder = threading.Thread(target=feed, args=(1000, 2000))
            feeder.start()
            _wait(lambda: second._assigned and first._assigned, 90)
            assert first._assigned.isdisjoint(second._assigned)
            feeder.join()
        # the second member left: the first gets everything back
        _wait(lambda: first._assigned == {0, 1, 2, 3}, 90)
        feed(2000, n)
        outputs = json_values(read_topic(topics.bootstrap, topics.output, expect=n,
                                         timeout_s=60, settle_s=1.0))
    seen = [(o["partition"], o["offset"]) for o in outputs]
    assert set(seen) == set(coords), "every input offset has a prediction"
    assert len(seen) == n, "and exactly one: commits on revocation cover what was emitted"


def test_security_settings_use_librdkafka_names(topics: Topics, artifact_dir: Path) -> None:
    settings = settings_for(topics, artifact_dir, security_protocol="SASL_SSL",
                            sasl_mechanism="SCRAM-SHA-512", sasl_username="u",
                            sasl_password="secret")
    conf = librdkafka_config(settings)
    assert conf["security.protocol"] == "sasl_ssl"
    assert conf["sasl.mechanism"] == "SCRAM-SHA-512"
    assert conf["sasl.username"] == "u" and conf["sasl.password"] == "secret"


def test_both_clients_take_the_transactional_id_from_one_rule(
    topics: Topics, artifact_dir: Path
) -> None:
    """transactional_id, else group_instance_id, else the group id and a random suffix; the
    same id under kafka-python's and librdkafka's names; none at all under at-least-once."""
    def ids(**extra: Any) -> tuple[str, str]:
        settings = settings_for(topics, artifact_dir, processing_guarantee="exactly_once",
                                changelog=True, **extra)
        kafka = KafkaEdge._transactional(settings)
        assert kafka["enable_idempotence"] is True
        return kafka["transactional_id"], transactional_config(settings)["transactional.id"]

    assert ids(transactional_id="pod-0", group_instance_id="m-0") == ("pod-0", "pod-0")
    assert ids(group_instance_id="m-0") == ("m-0", "m-0")
    kafka_id, confluent_id = ids()
    group = f"g-{topics.input}-"
    assert kafka_id.startswith(group) and confluent_id.startswith(group)
    assert len(kafka_id) == len(group) + 32 and kafka_id != confluent_id  # random per producer
    plain = settings_for(topics, artifact_dir, transactional_id="pod-0")
    assert KafkaEdge._transactional(plain) == {} and transactional_config(plain) == {}


def test_oauthbearer_is_refused_naming_the_field(topics: Topics, artifact_dir: Path) -> None:
    class OAuth:
        def __getattr__(self, name: str) -> object:
            return "OAUTHBEARER" if name == "sasl_mechanism" else getattr(base, name)

    base = settings_for(topics, artifact_dir)
    with pytest.raises(ConfigError, match="sasl_mechanism"):
        librdkafka_config(OAuth())  # type: ignore[arg-type]


def test_an_input_topic_that_does_not_exist_is_waited_for_not_a_crash(
    topics: Topics, artifact_dir: Path
) -> None:
    """librdkafka hands the poll an UNKNOWN_TOPIC_OR_PART error message: the service stays up,
    not ready and saying why, and serves the topic once it exists."""
    missing = Topics(topics.bootstrap, f"{topics.input}-later", topics.output, topics.dlq)
    settings = settings_for(missing, artifact_dir, kafka_client="confluent",
                            retry_backoff_max_s=0.5)
    with running_service(settings) as service:
        reasons: set[str] = set()
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            if not service.health.ready():
                reasons.add(service.health.not_ready_reason())
            time.sleep(0.05)
        assert any("Kafka unavailable" in r for r in reasons), reasons
        producer = Producer({"bootstrap.servers": topics.bootstrap})
        for key, value in _records(0, 20):
            producer.produce(missing.input, value, key)
        assert producer.flush(30) == 0
        out = read_topic(topics.bootstrap, topics.output, expect=20, timeout_s=60, settle_s=0)
    assert len(out) == 20


def test_readiness_is_false_while_every_broker_is_down(artifact_dir: Path) -> None:
    """librdkafka reconnects by itself and reports nothing when brokers come back: /readyz
    must still say 503 while they are all down, and 200 again once one answers."""
    from streamer.broker import EmbeddedBroker

    with EmbeddedBroker(num_brokers=1) as broker:
        t = Topics(broker.bootstrap_servers, "down", "down.out", "down.dlq")
        for name in (t.input, t.output, t.dlq):
            broker.create_topic(name, partitions=1)
        settings = settings_for(t, artifact_dir, kafka_client="confluent",
                                retry_backoff_max_s=0.5)
        with running_service(settings) as service:
            _wait(service.health.ready, 30)
            broker.set_broker_down(1)
            _wait(lambda: not service.health.ready(), 30)
            assert "Kafka unavailable" in service.health.not_ready_reason()
            broker.set_broker_up(1)
            _wait(service.health.ready, 30)

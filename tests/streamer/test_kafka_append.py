"""The accumulator fast path (``streamer.kafka_append``) writes exactly what
``KafkaProducer.send()`` writes: proved against the slow, obvious reference on the embedded
broker (same keys, values, headers, partitions and order, offsets and acknowledgements), and it
steps aside where ``send()`` must decide (size near the limit, transactions, other producers)."""

from __future__ import annotations

import time
import uuid

from kafka import KafkaProducer

from streamer.broker import EmbeddedBroker
from streamer.kafka_append import SIZE_MARGIN, appender
from streamer.kafka_edge import KafkaEdge

from ..kafka_helpers import read_topic


def _records(n: int) -> list[tuple[bytes, bytes | None, list[tuple[str, bytes]] | None]]:
    out: list[tuple[bytes, bytes | None, list[tuple[str, bytes]] | None]] = []
    for i in range(n):
        key = f"key-{i % 37}".encode()
        value = None if i % 50 == 49 else f'{{"i":{i},"v":"{"x" * (i % 300)}"}}'.encode()
        headers = [("h", str(i).encode()), ("dlq.reason", b"r")] if i % 7 == 0 else None
        out.append((key, value, headers))
    return out


def _producer(bootstrap: str, **extra: object) -> KafkaProducer:
    return KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=100,
                         batch_size=16 * 1024, max_in_flight_requests_per_connection=1,
                         metrics_enabled=False, **extra)


def test_fast_path_writes_what_send_writes(broker: EmbeddedBroker) -> None:
    slow_topic, fast_topic = f"slow-{uuid.uuid4().hex[:6]}", f"fast-{uuid.uuid4().hex[:6]}"
    broker.create_topic(slow_topic, partitions=3)
    broker.create_topic(fast_topic, partitions=3)
    records = _records(2000)
    producer = _producer(broker.bootstrap_servers)
    append = appender(producer)
    assert append is not None, "kafka-python's accumulator is reachable in this version"
    before = time.time() * 1e3
    slow = [producer.send(slow_topic, key=k, value=v, headers=h, partition=len(k) % 3)
            for k, v, h in records]
    fast = [append(fast_topic, len(k) % 3, k, v, h) for k, v, h in records]
    producer.flush(timeout=30)
    after = time.time() * 1e3
    for s, f in zip(slow, fast, strict=True):  # same acknowledgements, same offsets
        assert f is not None
        ms, mf = s.get(timeout=0), f.get(timeout=0)
        assert (ms.partition, ms.offset, ms.serialized_key_size, ms.serialized_value_size,
                ms.serialized_header_size) == (mf.partition, mf.offset, mf.serialized_key_size,
                                               mf.serialized_value_size,
                                               mf.serialized_header_size)
    producer.close()

    def written(topic: str) -> list[tuple[int, int, bytes, bytes | None, list[object]]]:
        got = read_topic(broker.bootstrap_servers, topic, len(records), settle_s=0.2)
        return sorted((r.partition, r.offset, r.key, r.value, list(r.headers)) for r in got)

    slow_written, fast_written = written(slow_topic), written(fast_topic)
    assert len(fast_written) == len(records)
    assert fast_written == slow_written
    timestamps = [r.timestamp for r in read_topic(broker.bootstrap_servers, fast_topic,
                                                  len(records), settle_s=0)]
    assert all(before - 1 <= ts <= after + 1 for ts in timestamps), "create time: now"


def test_fast_path_leaves_records_near_the_size_limit_to_send(broker: EmbeddedBroker) -> None:
    producer = _producer(broker.bootstrap_servers, max_request_size=10_000)
    append = appender(producer)
    assert append is not None
    broker.create_topic("sized", partitions=1)
    limit = 10_000 - SIZE_MARGIN
    assert append("sized", 0, b"k", b"v" * (limit - 1), None) is not None
    assert append("sized", 0, b"k", b"v" * limit, None) is None
    assert append("sized", 0, b"k", b"v" * (limit - 20), [("name", b"x" * 20)]) is None
    producer.flush(timeout=10)
    producer.close()


def test_no_fast_path_for_transactions_serializers_or_doubles(broker: EmbeddedBroker) -> None:
    serializing = _producer(broker.bootstrap_servers, value_serializer=bytes)
    assert appender(serializing) is None
    serializing.close()
    transactional = _producer(broker.bootstrap_servers, transactional_id="t-append",
                              enable_idempotence=True)
    assert appender(transactional) is None
    transactional.close()

    class Double:
        def send(self) -> None: ...

    assert appender(Double()) is None  # type: ignore[arg-type]

    other = _producer(broker.bootstrap_servers)  # an accumulator of another signature
    other._accumulator.append = lambda tp, key, value, headers: None  # type: ignore[method-assign]
    assert appender(other) is None
    other.close()


def test_edge_sends_through_the_fast_path_and_send_alike(broker: EmbeddedBroker) -> None:
    """Through the edge: keyed outputs take the fast path, keyless dead letters take send();
    one flush acknowledges both and every record lands where send() would put it."""
    from streamer.settings import StreamerSettings

    out = f"out-{uuid.uuid4().hex[:6]}"
    broker.create_topic(out, partitions=4)
    broker.create_topic("in-append", partitions=4)
    settings = StreamerSettings(bootstrap_servers=broker.bootstrap_servers,
                                input_topic="in-append", output_topic=out,
                                group_id=f"g-{uuid.uuid4().hex[:6]}")
    edge = KafkaEdge(settings, lambda p: None, lambda p: None)
    try:
        assert edge._append is not None
        keys = [f"k{i}".encode() for i in range(200)]
        for k in keys:
            edge.send(out, k, b"v-" + k)
        edge.send(out, None, b"keyless")
        edge.flush()
        reference = KafkaProducer(bootstrap_servers=broker.bootstrap_servers)
        expected = {k: reference.send(out, key=k, value=b"x").get(timeout=10).partition
                    for k in keys[:20]}
        reference.close()
    finally:
        edge.close()
    got = read_topic(broker.bootstrap_servers, out, len(keys) + 1 + 20, settle_s=0.2)
    placed = {r.key: r.partition for r in got if r.value != b"x" and r.key is not None}
    assert len(got) == len(keys) + 1 + 20
    assert {k: placed[k] for k in expected} == expected, "the default partitioner's choice"
    assert sum(1 for r in got if r.key is None) == 1

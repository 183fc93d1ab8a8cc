"""Hostile input through the real service and the embedded broker: every offset ends as one
prediction or one dead letter with the right reason, a key's state is never poisoned, every
output record is RFC 8259 JSON, and no record stops its partition."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from confluent_kafka import Producer
from kafka import KafkaProducer

from streamer.artifact import load_artifact

from ..kafka_helpers import Topics, produce, read_topic
from ..reference import reference_predictions
from .service_helpers import running_service, sample, scrape, settings_for


def strict_json(value: bytes) -> Any:
    """RFC 8259: NaN and Infinity are not JSON."""
    def refuse(token: str) -> Any:
        raise ValueError(f"not JSON: {token}")
    return json.loads(value, parse_constant=refuse)


def event(values: list[float], ts: float | None = None, **extra: Any) -> bytes:
    return json.dumps({"ts": time.time() if ts is None else ts, "values": values, **extra}).encode()


def headers_of(record: Any) -> dict[str, bytes]:
    return dict(record.headers or [])


def _send_and_wait(topics: Topics, key: bytes, value: bytes, topic: str, seen: int) -> list[Any]:
    """Produce one record and wait until ``topic`` holds ``seen + 1`` records."""
    produce(topics.bootstrap, topics.input, [(key, value)])
    records = read_topic(topics.bootstrap, topic, expect=seen + 1, timeout_s=60, settle_s=0)
    assert len(records) == seen + 1
    return records


def test_values_that_overflow_float32_are_out_of_range_and_leave_state_untouched(
    topics: Topics, artifact_dir: Path
) -> None:
    now = time.time()
    good1, good2 = [0.5, -1.0, 2.0, 0.25], [1.5, 0.0, -2.0, 3.0]
    records = [
        (b"a", event(good1, now)),
        (b"a", event([1.7976931348623157e308] * 4, now + 1)),  # "no reading" placeholder
        (b"a", event([1.0, 1e39, 0.0, 0.0], now + 2)),
        (b"a", event(good2, now + 3)),
    ]
    with running_service(settings_for(topics, artifact_dir)) as service:
        coords = produce(topics.bootstrap, topics.input, records)
        outputs = read_topic(topics.bootstrap, topics.output, expect=2)
        dead = read_topic(topics.bootstrap, topics.dlq, expect=2)
        text = scrape(service.http.port)[1]
    assert [headers_of(r)["dlq.reason"] for r in dead] == [b"out_of_range"] * 2
    assert [int(headers_of(r)["dlq.source.offset"]) for r in dead] == [o for _, o in coords[1:3]]
    preds = [strict_json(r.value) for r in outputs]
    assert [p["offset"] for p in preds] == [coords[0][1], coords[3][1]]
    model = load_artifact(artifact_dir).model
    expected = reference_predictions(model, ["a", "a"], np.array([good1, good2]),
                                     np.array([now, now + 3]))
    np.testing.assert_allclose([p["prediction"] for p in preds], expected, rtol=1e-5, atol=1e-6)
    assert sample(text, "streamer_dead_letter_total", 'reason="out_of_range"') == 2


def test_a_step_that_overflows_keeps_the_key_state_and_dead_letters_the_event(
    topics: Topics, touchy_artifact: Path
) -> None:
    now = time.time()
    good1, bad, good2 = [0.5, -1.0, 2.0, 0.25], [3e38, -3e38, 3e38, -3e38], [1.5, 0.0, -2.0, 3.0]
    with running_service(settings_for(topics, touchy_artifact)) as service:
        _send_and_wait(topics, b"a", event(good1, now), topics.output, 0)
        dead = _send_and_wait(topics, b"a", event(bad, now + 1), topics.dlq, 0)
        outputs = _send_and_wait(topics, b"a", event(good2, now + 2), topics.output, 1)
        text = scrape(service.http.port)[1]
    h = headers_of(dead[0])
    assert h["dlq.reason"] == b"non_finite_output"
    assert h["dlq.key"] == b"a" and h["dlq.model.version"] == b"v-touchy"
    assert h["dlq.source.offset"] == b"1"  # the key's second record
    preds = [strict_json(r.value) for r in outputs]
    model = load_artifact(touchy_artifact).model
    expected = reference_predictions(model, ["a", "a"], np.array([good1, good2]),
                                     np.array([now, now + 2]))
    # The key went on from its last good state, as if the overflowing event never came.
    np.testing.assert_allclose([p["prediction"] for p in preds], expected, rtol=1e-5, atol=1e-6)
    assert all(np.isfinite(p["prediction"]).all() for p in preds)
    assert sample(text, "streamer_dead_letter_total", 'reason="non_finite_output"') == 1


def test_event_time_outside_the_plausible_range_is_bad_timestamp_and_latency_never_negative(
    topics: Topics, artifact_dir: Path
) -> None:
    now = time.time()
    bad_ts = [0, -1, -1e300, now - 7200, "1970-01-01T00:00:01"]
    records = [(b"a", event([1, 2, 3, 4], ts)) for ts in bad_ts]
    records += [(b"b", event([1, 2, 3, 4], now + 120)), (b"c", event([1, 2, 3, 4], now))]
    settings = settings_for(topics, artifact_dir, max_past_s=3600)
    with running_service(settings) as service:
        produce(topics.bootstrap, topics.input, records)
        outputs = read_topic(topics.bootstrap, topics.output, expect=2)
        dead = read_topic(topics.bootstrap, topics.dlq, expect=len(bad_ts))
        text = scrape(service.http.port)[1]
    assert sorted(strict_json(r.value)["key"] for r in outputs) == ["b", "c"]
    assert [headers_of(r)["dlq.reason"] for r in dead] == [b"bad_timestamp"] * len(bad_ts)
    # The event stamped 120 s ahead is counted and observed as 0, never as -120 s.
    assert sample(text, "streamer_negative_latency_total") == 1
    total = sample(text, "streamer_end_to_end_latency_seconds_sum")
    assert 0 <= total < 60
    assert sample(text, "streamer_end_to_end_latency_seconds_count") == 2


def test_keyless_tombstone_is_dead_lettered_and_the_batch_goes_on(
    topics: Topics, artifact_dir: Path
) -> None:
    producer = Producer({"bootstrap.servers": topics.bootstrap})
    producer.produce(topics.input, key=b"a", value=event([1, 2, 3, 4]), partition=0)
    producer.produce(topics.input, key=None, value=None, partition=0)  # keyless tombstone
    producer.produce(topics.input, key=b"a", value=event([1, 2, 3, 4]), partition=0)
    assert producer.flush(10) == 0
    with running_service(settings_for(topics, artifact_dir)):
        outputs = read_topic(topics.bootstrap, topics.output, expect=2)
        dead = read_topic(topics.bootstrap, topics.dlq, expect=1)
    assert [strict_json(r.value)["offset"] for r in outputs] == [0, 2]
    h = headers_of(dead[0])
    assert h["dlq.reason"] == b"not_json" and h["dlq.tombstone"] == b"1"
    assert dead[0].key is None and dead[0].value == b""
    assert h["dlq.source.offset"] == b"1"


def test_long_keys_and_oversized_messages_become_dead_letters_that_fit(
    topics: Topics, artifact_dir: Path, kafka_client: str
) -> None:
    big_producer = KafkaProducer(bootstrap_servers=topics.bootstrap, max_request_size=4 << 20)
    for key, value in [
        (b"k" * 600_000, event([1, 2, 3, 4])),  # valid event, 600 KB key
        (b"a", b"x" * 1_048_420),  # a default producer's largest message, not JSON
        (b"a", b"{" * (2 << 20)),  # over 1 MiB
        (b"a", event([1, 2, 3, 4])),
    ]:
        big_producer.send(topics.input, key=key, value=value, partition=0)
    big_producer.flush()
    big_producer.close()
    with running_service(settings_for(topics, artifact_dir,
                                      kafka_client=kafka_client)) as service:
        outputs = read_topic(topics.bootstrap, topics.output, expect=1)
        dead = read_topic(topics.bootstrap, topics.dlq, expect=3)
        text = scrape(service.http.port)[1]
    assert [strict_json(r.value)["offset"] for r in outputs] == [3]
    reasons = [(headers_of(r)["dlq.reason"], int(headers_of(r)["dlq.source.offset"]))
               for r in dead]
    assert reasons == [(b"key_too_long", 0), (b"not_json", 1), (b"not_json", 2)]
    first, second, third = (headers_of(r) for r in dead)
    assert first["dlq.key.truncated"] == b"600000" and len(dead[0].key) == 4096
    assert second["dlq.value.truncated"] == b"1048420"
    assert third["dlq.value.truncated"] == str(2 << 20).encode()
    for record in dead:
        assert len(record.value) + len(record.key or b"") < 1_048_576
    assert sample(text, "streamer_records_refused_total", 'outcome="dropped"') == 0


def test_a_record_the_producer_refuses_is_replaced_by_a_dead_letter(
    topics: Topics, artifact_dir: Path, kafka_client: str
) -> None:
    """A prediction bigger than max_request_size (a long key, allowed here) is refused by the
    producer; a small dead letter replaces it and the partition moves on."""
    settings = settings_for(topics, artifact_dir, max_request_size=65_536, max_key_bytes=200_000,
                            kafka_client=kafka_client)
    records = [(b"k" * 100_000, event([1, 2, 3, 4])), (b"a", event([1, 2, 3, 4]))]
    with running_service(settings) as service:
        produce(topics.bootstrap, topics.input, records)
        outputs = read_topic(topics.bootstrap, topics.output, expect=1)
        dead = read_topic(topics.bootstrap, topics.dlq, expect=1)
        text = scrape(service.http.port)[1]
    assert [strict_json(r.value)["key"] for r in outputs] == ["a"]
    h = headers_of(dead[0])
    assert h["dlq.reason"] == b"refused_by_broker"
    assert h["dlq.refused.topic"] == topics.output.encode()
    assert any(name in h["dlq.detail"] for name in (b"MessageSizeTooLarge",  # kafka-python
                                                    b"MSG_SIZE_TOO_LARGE"))  # librdkafka
    assert sample(text, "streamer_records_refused_total", 'outcome="replaced"') == 1
    assert sample(text, "streamer_dead_letter_total", 'reason="refused_by_broker"') == 1


@pytest.mark.parametrize("codec", ["gzip", "snappy", "lz4", "zstd"])
def test_compressed_input_is_consumed_and_output_compression_is_a_setting(
    topics: Topics, artifact_dir: Path, codec: str
) -> None:
    producer = KafkaProducer(bootstrap_servers=topics.bootstrap, compression_type=codec,
                             linger_ms=20)
    for i in range(20):
        producer.send(topics.input, key=f"k{i}".encode(), value=event([i, 1, 2, 3]))
    producer.flush()
    producer.close()
    settings = settings_for(topics, artifact_dir, output_compression=codec)
    with running_service(settings) as service:
        outputs = read_topic(topics.bootstrap, topics.output, expect=20)
        assert service.edge is not None
        assert service.edge.producer.config["compression_type"] == codec
    assert sorted(strict_json(r.value)["key"] for r in outputs) == sorted(
        f"k{i}" for i in range(20))

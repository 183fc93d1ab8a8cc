"""Output records handed straight to kafka-python's record accumulator: the same records as
``KafkaProducer.send()`` makes, without its per-call checks.

Measured on the 2-core development machine (process CPU per record, 3 embedded brokers, a
~190-byte prediction, a flush every 2,048 records): ``send()`` 32 µs, the accumulator's
``append()`` alone 14 µs. ``send()`` re-validates the topic name, waits on metadata, looks the
partition up twice, asserts every header and estimates the size on every call; for the records
this project produces, all of that is known once per topic:

- the topic is checked and its metadata fetched by ``partitions_for()`` the first time a
  (topic, partition) comes (the caller computes the partition with kafka-python's default
  partitioner);
- there are no serializers (keys and values are bytes already) and no transaction (an
  exactly-once producer always goes through ``send()``, which adds partitions to the
  transaction);
- the size check is kept as a bound: a record within 1 KiB of ``max_request_size`` goes through
  ``send()``, which estimates exactly and refuses it with ``MessageSizeTooLargeError`` (the
  refused-record path then dead-letters it).

What follows ``send()``'s checks is what it does itself: ``append`` to the accumulator (same
timestamp, record batch and per-record future) and wake the sender thread when a batch was
created or filled. Producers without those internals, or whose accumulator's ``append`` has
another signature (another kafka-python version, a test double), get no fast path:
:func:`appender` returns None and every record goes through ``send()``.
``tests/streamer/test_kafka_append.py`` proves both paths write identical records.

Usage::

    append = appender(producer)               # None: use producer.send()
    future = append(topic, partition, key, value, headers) if append else None
    future = future or producer.send(topic, key=key, value=value, partition=partition)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from kafka import KafkaProducer, TopicPartition
from kafka.producer.future import FutureRecordMetadata

from streamer.edge import Headers

# (topic, partition, key, value, headers) -> the record's future, or None: use send()
Append = Callable[[str, int, bytes, bytes | None, Headers | None], FutureRecordMetadata | None]
SIZE_MARGIN = 1024  # bytes below max_request_size left to send()'s exact estimate


def appender(producer: KafkaProducer) -> Append | None:
    """A function appending one keyed record to ``producer``'s accumulator, returning its
    future, or None for a record ``send()`` must handle (too close to the size limit). None
    instead of a function when ``producer`` cannot take this path (see the module doc)."""
    accumulator = getattr(producer, "_accumulator", None)
    sender = getattr(producer, "_sender", None)
    config: dict[str, Any] = getattr(producer, "config", {})
    if (not callable(getattr(accumulator, "append", None))
            or not callable(getattr(sender, "wakeup", None))
            or config.get("transactional_id") is not None
            or config.get("key_serializer") is not None
            or config.get("value_serializer") is not None
            or "max_request_size" not in config):
        return None
    assert accumulator is not None and sender is not None
    try:  # the internal signature this relies on (kafka-python 2.3); another one: use send()
        params = list(inspect.signature(accumulator.append).parameters)[:5]
    except (TypeError, ValueError):
        return None
    if params != ["tp", "timestamp_ms", "key", "value", "headers"]:
        return None
    limit = config["max_request_size"] - SIZE_MARGIN
    tps: dict[tuple[str, int], TopicPartition] = {}
    append, wakeup = accumulator.append, sender.wakeup

    def append_record(topic: str, partition: int, key: bytes, value: bytes | None,
                      headers: Headers | None) -> FutureRecordMetadata | None:
        size = len(key) + (len(value) if value is not None else 0)
        if headers:
            size += sum(len(name) + len(data) for name, data in headers)
        if size > limit:
            return None
        tp = tps.get((topic, partition))
        if tp is None:
            # As send() does: validate the topic, add it to the producer's metadata and wait
            # (up to max_block_ms) until its partitions are known, so the sender can route it.
            if partition not in producer.partitions_for(topic):
                raise ValueError(f"{topic} has no partition {partition}")
            tp = tps[(topic, partition)] = TopicPartition(topic, partition)
        future, batch_is_full, new_batch = append(tp, None, key, value, headers or [])
        if batch_is_full or new_batch:
            wakeup()
        return future  # type: ignore[no-any-return]

    return append_record

"""Reading a bounded slice of the input topic as training history (no consumer group, nothing
committed): from a time or start offsets up to the end offsets seen when reading starts.

Usage::

    sliced = read_topic("kafka:9092", "events", since=time.time() - 7 * 86400)
    sliced.records, sliced.offsets        # [Message], {partition: (start, stop)}
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from streamer.errors import KafkaEdgeError
from streamer.events import Message


@dataclass
class TopicSlice:
    """What was read from a topic: the records and, per partition, [start, stop) offsets."""

    records: list[Message]
    offsets: dict[int, tuple[int, int]]


def read_topic(
    bootstrap_servers: str,
    topic: str,
    *,
    since: float | None = None,
    until: float | None = None,
    start_offsets: dict[int, int] | int | None = None,
    consumer_config: Mapping[str, Any] | None = None,
    timeout_s: float = 120.0,
) -> TopicSlice:
    """Read a bounded slice of ``topic``: from a time or offset up to the end offsets seen now.
    Fails after ``timeout_s`` without a record (a slow read that keeps moving goes on).

    ``since``/``until`` select by record timestamp (epoch seconds): the consumer seeks with
    offsets_for_times and also filters, so a broker that cannot look up times still gives
    the right records (it only reads more). ``start_offsets`` as a dict reads only the
    partitions it names. No consumer group: nothing is committed.
    """
    from kafka import KafkaConsumer, TopicPartition
    from kafka.errors import KafkaError

    try:
        consumer = KafkaConsumer(
            bootstrap_servers=bootstrap_servers, group_id=None, enable_auto_commit=False,
            # Retention may delete the start offset while we read: resume at the new start.
            auto_offset_reset="earliest", fetch_max_wait_ms=10, client_id="trainer",
            **dict(consumer_config or {}),
        )
    except KafkaError as exc:
        raise KafkaEdgeError(f"cannot connect to {bootstrap_servers}: {exc}") from exc
    try:
        partitions = _partitions(consumer, topic, timeout_s)
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        start, stop = _bounds(consumer, tps, since, until, start_offsets)
        records = _read_to_stop(consumer, start, stop, since, until, timeout_s)
    except KafkaError as exc:
        raise KafkaEdgeError(f"reading {topic} from {bootstrap_servers} failed: {exc}") from exc
    finally:
        consumer.close()
    offsets = {tp.partition: (start[tp], stop[tp]) for tp in tps}
    return TopicSlice(records, offsets)


def _partitions(consumer: Any, topic: str, timeout_s: float) -> set[int]:
    deadline = time.monotonic() + min(timeout_s, 30.0)
    while True:
        partitions = consumer.partitions_for_topic(topic)
        if partitions:
            return set(partitions)
        if time.monotonic() > deadline:
            raise KafkaEdgeError(f"topic {topic!r} not found")
        time.sleep(0.2)


def _bounds(
    consumer: Any,
    tps: list[Any],
    since: float | None,
    until: float | None,
    start_offsets: dict[int, int] | int | None,
) -> tuple[dict[Any, int], dict[Any, int]]:
    begin = consumer.beginning_offsets(tps)
    stop = dict(consumer.end_offsets(tps))  # a snapshot: a growing topic still ends
    start = dict(begin)
    if isinstance(start_offsets, int):
        start = {tp: max(begin[tp], start_offsets) for tp in tps}
    elif start_offsets is not None:
        start = {tp: max(begin[tp], start_offsets.get(tp.partition, stop[tp])) for tp in tps}
    for bound, at in ((since, start), (until, stop)):
        if bound is None:
            continue
        found = consumer.offsets_for_times({tp: int(bound * 1000) for tp in tps})
        for tp, hit in found.items():
            if hit is not None:  # None: no such record, or a broker that cannot tell
                at[tp] = max(at[tp], hit.offset) if at is start else min(at[tp], hit.offset)
    return start, stop


def _read_to_stop(
    consumer: Any,
    start: dict[Any, int],
    stop: dict[Any, int],
    since: float | None,
    until: float | None,
    timeout_s: float,
) -> list[Message]:
    pending = {tp for tp in start if start[tp] < stop[tp]}
    for tp in start:
        consumer.seek(tp, start[tp])
    lo = -math.inf if since is None else since * 1000
    hi = math.inf if until is None else until * 1000
    records: list[Message] = []
    # An idle bound, not a total one: a long history read slowly is fine while it moves.
    deadline = time.monotonic() + timeout_s
    while pending:
        if time.monotonic() > deadline:
            raise KafkaEdgeError(f"no progress reading to the end offsets for {timeout_s:.0f} s "
                                 f"({len(records)} read)")
        for tp, batch in consumer.poll(timeout_ms=200, max_records=10_000).items():
            if batch:
                deadline = time.monotonic() + timeout_s
            for msg in batch:
                if msg.offset < stop[tp] and lo <= msg.timestamp < hi:
                    records.append(Message(msg.key, msg.value, msg.partition, msg.offset))
        for tp in list(pending):
            if consumer.position(tp) >= stop[tp]:
                pending.discard(tp)
                consumer.pause(tp)
    return records

"""The Kafka edge (kafka-python): batches in, predictions and dead letters out, commits after acks.

At-least-once is the contract: offsets of a batch are committed only once every record the
batch produced (predictions and dead letters) has been acknowledged by the broker. A crash
before that re-delivers the batch; nothing is ever skipped silently. Offset gaps (e.g. the
broker's retention deleted data a lagging consumer had not read) are counted and logged loudly.

Usage::

    edge = KafkaEdge(settings, on_assign=..., on_revoke=...)
    batch = edge.poll()                        # list[Message] (possibly empty)
    edge.send(topic, key, value, headers)      # buffered
    edge.flush_and_commit(batch)               # wait for acks, then commit
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import (
    CorruptRecordError,
    InvalidRecordError,
    KafkaError,
    MessageSizeTooLargeError,
    PolicyViolationError,
    RecordListTooLargeError,
)
from kafka.partitioner.default import DefaultPartitioner
from kafka.producer.future import FutureRecordMetadata
from kafka.structs import OffsetAndMetadata

from streamer.errors import KafkaEdgeError
from streamer.events import Message
from streamer.settings import StreamerSettings

log = logging.getLogger(__name__)

PartitionCallback = Callable[[set[int]], None]
Headers = list[tuple[str, bytes]]
Record = tuple[str, bytes | None, bytes | None, Headers | None]  # topic, key, value, headers
# (record, origin given to send(), error, final) -> a replacement to send, or None
RefusedCallback = Callable[[Record, object, Exception, bool], Record | None]
# Refusals of the record itself (size, format, policy): sending it again cannot succeed.
REFUSED = (MessageSizeTooLargeError, RecordListTooLargeError, InvalidRecordError,
           CorruptRecordError, PolicyViolationError)


class _Listener(ConsumerRebalanceListener):
    """Runs inside ``poll()``, i.e. between batches: the previous batch is already committed.

    Eager rebalancing revokes everything and then assigns the new set, so keys are released
    only for partitions that did not come back: state that stays with this process survives.
    """

    def __init__(self, edge: KafkaEdge) -> None:
        self.edge = edge
        self.revoked: set[int] = set()

    def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        self.revoked = {tp.partition for tp in revoked}
        self.edge.commit_pending()

    def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        now_assigned = {tp.partition for tp in assigned}
        lost = self.revoked - now_assigned
        self.revoked = set()
        try:
            if lost:
                self.edge.forget(lost)
                self.edge.on_revoke(lost)
        finally:
            # Whatever happened while releasing, the new assignment must be known.
            self.edge.on_assign(now_assigned)


class KafkaEdge:
    def __init__(
        self,
        settings: StreamerSettings,
        on_assign: PartitionCallback,
        on_revoke: PartitionCallback,
        on_gap: Callable[[int, int], None] | None = None,
        consumer: KafkaConsumer | None = None,
        producer: KafkaProducer | None = None,
        on_refused: RefusedCallback | None = None,
    ) -> None:
        self.settings = settings
        self.topic = settings.input_topic
        self.on_assign = on_assign
        self.on_revoke = on_revoke
        self.on_gap = on_gap or (lambda partition, n: None)
        self.on_refused = on_refused
        security = settings.kafka_security_kwargs()
        self.consumer = consumer or KafkaConsumer(
            bootstrap_servers=settings.bootstrap_servers.split(","),
            group_id=settings.group_id,
            enable_auto_commit=False,
            auto_offset_reset=settings.auto_offset_reset,
            fetch_max_wait_ms=settings.fetch_max_wait_ms,
            max_poll_records=settings.max_batch_events,
            client_id=f"streamer-{settings.group_id}",
            **security,
        )
        self.producer = producer or KafkaProducer(
            bootstrap_servers=settings.bootstrap_servers.split(","),
            acks="all",
            linger_ms=1,
            batch_size=256 * 1024,
            # One request in flight keeps a key's predictions in order across retries.
            max_in_flight_requests_per_connection=1,
            max_request_size=settings.max_request_size,
            compression_type=(None if settings.output_compression == "none"
                              else settings.output_compression),
            client_id=f"streamer-{settings.group_id}-out",
            **security,
        )
        self._futures: list[FutureRecordMetadata] = []
        self._sent: list[tuple[Record, object]] = []  # what each future sent, and its origin
        self._partitions: dict[str, tuple[list[int], dict[bytes, int]]] = {}
        self._next_offset: dict[int, int] = {}  # partition -> next offset we expect to see
        self._uncommitted: dict[int, int] = {}  # partition -> offset to commit (acked)
        self.consumer.subscribe([self.topic], listener=_Listener(self))

    def poll(self) -> list[Message]:
        """Up to ``max_batch_events`` records gathered within ``max_batch_wait_ms``: fetching
        goes on until the batch is full or the time is up, so that one engine step and one ack
        round-trip cover many events. Returns an empty list when nothing came (so the loop can
        heartbeat and swap models while idle)."""
        limit, wait_s = self.settings.max_batch_events, self.settings.max_batch_wait_ms / 1e3
        batch: list[Message] = []
        deadline = time.monotonic() + wait_s
        while len(batch) < limit:
            remaining_ms = max(int((deadline - time.monotonic()) * 1e3), 0)
            try:
                records = self.consumer.poll(timeout_ms=remaining_ms,
                                             max_records=limit - len(batch))
            except KafkaError as exc:
                raise KafkaEdgeError(f"poll failed: {exc}") from exc
            for tp, msgs in records.items():
                if not msgs:
                    continue
                self._check_gap(tp.partition, msgs[0].offset)
                self._next_offset[tp.partition] = msgs[-1].offset + 1
                batch.extend(Message(m.key, m.value, tp.partition, m.offset) for m in msgs)
            if remaining_ms == 0 or (not records and not batch):
                break
        return batch

    def forget(self, partitions: set[int]) -> None:
        """Drop positions of partitions that moved to another member: when one comes back,
        the offsets in between were someone else's to process, not a gap."""
        for p in partitions:
            self._next_offset.pop(p, None)
            self._uncommitted.pop(p, None)

    def _check_gap(self, partition: int, first_offset: int) -> None:
        expected = self._next_offset.get(partition)
        if expected is None:
            # First records since the assignment: compare with the group's committed offset,
            # which catches a reset after the broker deleted what we had not read yet.
            try:
                expected = self.consumer.committed(TopicPartition(self.topic, partition))
            except KafkaError as exc:
                log.warning("cannot read the committed offset of %s[%d]: %s", self.topic,
                            partition, exc)
        if expected is not None and first_offset > expected:
            skipped = first_offset - expected
            log.warning(
                "SKIPPED %d offsets on %s[%d] (%d..%d): the broker no longer has them "
                "(retention) or they were control records; those events were NOT processed",
                skipped, self.topic, partition, expected, first_offset - 1,
            )
            self.on_gap(partition, skipped)

    def send(
        self, topic: str, key: bytes | None, value: bytes | None,
        headers: list[tuple[str, bytes]] | None = None, origin: object = None,
    ) -> None:
        """Buffer one record; ``origin`` (e.g. the input message) is handed to ``on_refused``
        if the producer or the broker refuses this record."""
        try:
            partition = self._partition(topic, key)
            self._futures.append(
                self.producer.send(topic, key=key, value=value, headers=headers,
                                   partition=partition)
            )
            self._sent.append(((topic, key, value, headers), origin))
        except KafkaError as exc:
            raise KafkaEdgeError(f"produce to {topic} failed: {exc}") from exc

    def _partition(self, topic: str, key: bytes | None) -> int | None:
        """The default (murmur2) partition of ``key``, memoized: keys repeat, and hashing in
        pure Python costs a third of kafka-python's per-record send time."""
        if key is None:
            return None
        cached = self._partitions.get(topic)
        if cached is None or len(cached[1]) > 100_000:
            # Re-reading the partition list now and then also picks up added partitions.
            parts = sorted(self.producer.partitions_for(topic))
            cached = self._partitions[topic] = (parts, {})
        parts, memo = cached
        partition = memo.get(key)
        if partition is None:
            partition = memo[key] = DefaultPartitioner()(key, parts, parts)
        return partition

    def flush_and_commit(self, batch: Sequence[Message]) -> None:
        """Wait until the broker acknowledged every record sent for ``batch``, then commit it."""
        self.flush()
        for msg in batch:
            self._uncommitted[msg.partition] = max(
                self._uncommitted.get(msg.partition, 0), msg.offset + 1
            )
        self.commit_pending()

    def flush(self) -> None:
        futures, self._futures = self._futures, []
        sent, self._sent = self._sent, []
        if not futures:
            return
        self.producer.flush()
        failed = [f for f in futures if f.failed()]
        if failed and self.on_refused is not None:
            failed = self._replace_refused(futures, sent)
        if failed:
            raise KafkaEdgeError(
                f"{len(failed)} of {len(futures)} records were not acknowledged: "
                f"{failed[0].exception}; offsets not committed, the batch will be re-delivered"
            )

    def _replace_refused(
        self, futures: list[FutureRecordMetadata], sent: list[tuple[Record, object]]
    ) -> list[FutureRecordMetadata]:
        """Send ``on_refused``'s replacement (e.g. a dead letter that fits) for every record
        refused for what it is, so such a record never stops its partition; a replacement
        refused again is reported as final and dropped. Returns the transient failures."""
        assert self.on_refused is not None
        transient: list[FutureRecordMetadata] = []
        retried: list[tuple[Record, object, FutureRecordMetadata]] = []
        for future, (record, origin) in zip(futures, sent, strict=True):
            if not future.failed():
                continue
            if not isinstance(future.exception, REFUSED):
                transient.append(future)
                continue
            replacement = self.on_refused(record, origin, future.exception, False)
            if replacement is not None:
                topic, key, value, headers = replacement
                retried.append((replacement, origin, self.producer.send(
                    topic, key=key, value=value, headers=headers,
                    partition=self._partition(topic, key))))
        if retried:
            self.producer.flush()
        for replacement, origin, future in retried:
            if future.failed():
                if isinstance(future.exception, REFUSED):
                    self.on_refused(replacement, origin, future.exception, True)
                else:
                    transient.append(future)
        return transient

    def commit_pending(self) -> bool:
        """Commit acknowledged offsets; returns whether a commit was made."""
        if not self._uncommitted:
            return False
        offsets = {
            TopicPartition(self.topic, p): OffsetAndMetadata(o, "", -1)
            for p, o in self._uncommitted.items()
        }
        try:
            self.consumer.commit(offsets)
        except KafkaError as exc:
            raise KafkaEdgeError(f"commit failed: {exc}") from exc
        self._uncommitted.clear()
        return True

    def assigned_partitions(self) -> set[int]:
        return {tp.partition for tp in self.consumer.assignment()}

    def lag(self) -> dict[tuple[str, int], float]:
        """Messages between our position and the high watermark the last fetch reported.
        Both are the consumer's local state: measuring lag sends no request."""
        lags: dict[tuple[str, int], float] = {}
        for tp in self.consumer.assignment():
            high = self.consumer.highwater(tp)
            position = self.consumer.position(tp, timeout_ms=0)
            if high is not None and position is not None:
                lags[(tp.topic, tp.partition)] = float(max(high - position, 0))
        return lags

    def close(self, timeout_s: float = 10.0) -> None:
        """Flush what is buffered, commit it, leave the group. Safe to call twice."""
        deadline = time.monotonic() + timeout_s
        try:
            self.producer.flush(timeout=max(deadline - time.monotonic(), 0.1))
        finally:
            self.producer.close(timeout=max(deadline - time.monotonic(), 0.1))
            self.consumer.close(autocommit=False)

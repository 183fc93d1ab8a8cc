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
from kafka.errors import KafkaError
from kafka.partitioner.default import DefaultPartitioner
from kafka.producer.future import FutureRecordMetadata
from kafka.structs import OffsetAndMetadata

from streamer.errors import KafkaEdgeError
from streamer.events import Message
from streamer.settings import StreamerSettings

log = logging.getLogger(__name__)

PartitionCallback = Callable[[set[int]], None]


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
    ) -> None:
        self.settings = settings
        self.topic = settings.input_topic
        self.on_assign = on_assign
        self.on_revoke = on_revoke
        self.on_gap = on_gap or (lambda partition, n: None)
        security = settings.kafka_security_kwargs()
        self.consumer = consumer or KafkaConsumer(
            bootstrap_servers=settings.bootstrap_servers.split(","),
            group_id=settings.group_id,
            enable_auto_commit=False,
            auto_offset_reset=settings.auto_offset_reset,
            fetch_max_wait_ms=settings.fetch_max_wait_ms,
            max_poll_records=settings.max_batch_events,
            metrics_enabled=False,  # its sensors cost ~10% of the loop; we export our own
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
            metrics_enabled=False,
            client_id=f"streamer-{settings.group_id}-out",
            **security,
        )
        self._futures: list[FutureRecordMetadata] = []
        self._partitions: dict[str, tuple[list[int], dict[bytes, int]]] = {}
        self._next_offset: dict[int, int] = {}  # partition -> next offset we expect to see
        self._uncommitted: dict[int, int] = {}  # partition -> offset to commit (acked)
        self.consumer.subscribe([self.topic], listener=_Listener(self))

    def poll(self) -> list[Message]:
        """Up to ``max_batch_events`` records gathered within ``max_batch_wait_ms``: fetching
        goes on until the batch is full, the time is up or the records reach the high watermark
        of their last fetch (everything the broker had was taken: waiting longer would only add
        latency when traffic is light; when behind, batches keep filling, which amortizes the
        per-batch cost and catches up). Returns an empty list when nothing came (so the loop
        can heartbeat and swap models while idle)."""
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
            caught_up = True
            for tp, msgs in records.items():
                if not msgs:
                    continue
                self._check_gap(tp.partition, msgs[0].offset)
                self._next_offset[tp.partition] = msgs[-1].offset + 1
                batch.extend(Message(m.key, m.value, tp.partition, m.offset) for m in msgs)
                high = self.consumer.highwater(tp)
                caught_up = caught_up and (high is None or msgs[-1].offset + 1 >= high)
            if remaining_ms == 0 or not batch or caught_up:
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
        headers: list[tuple[str, bytes]] | None = None,
    ) -> None:
        try:
            partition = self._partition(topic, key)
            self._futures.append(
                self.producer.send(topic, key=key, value=value, headers=headers,
                                   partition=partition)
            )
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
        """Wait until the broker acknowledged every record sent for ``batch``, then commit it
        asynchronously: the loop does not wait for the coordinator (the commit's result comes
        in a later poll; a failed one is retried with the next). Offsets still in flight are
        committed synchronously on revocation and on close, so a graceful stop or a rebalance
        re-delivers nothing that was acknowledged."""
        self.flush()
        for msg in batch:
            self._uncommitted[msg.partition] = max(
                self._uncommitted.get(msg.partition, 0), msg.offset + 1
            )
        self.commit_pending(asynchronous=True)

    def flush(self) -> None:
        futures, self._futures = self._futures, []
        if not futures:
            return
        self.producer.flush()
        failed = [f for f in futures if f.failed()]
        if failed:
            raise KafkaEdgeError(
                f"{len(failed)} of {len(futures)} records were not acknowledged: "
                f"{failed[0].exception}; offsets not committed, the batch will be re-delivered"
            )

    def commit_pending(self, asynchronous: bool = False) -> bool:
        """Commit acknowledged offsets; returns whether a commit was made (or, asynchronous,
        sent). Entries stay pending until a commit covering them succeeded."""
        if not self._uncommitted:
            return False
        sent = dict(self._uncommitted)
        offsets = {
            TopicPartition(self.topic, p): OffsetAndMetadata(o, "", -1)
            for p, o in sent.items()
        }
        try:
            if asynchronous:
                self.consumer.commit_async(
                    offsets, callback=lambda _offsets, result: self._committed(sent, result))
                return True
            self.consumer.commit(offsets)
        except KafkaError as exc:
            raise KafkaEdgeError(f"commit failed: {exc}") from exc
        self._committed(sent, None)
        return True

    def _committed(self, sent: dict[int, int], result: object) -> None:
        """Drop pending offsets a successful commit covered (runs inside poll when async)."""
        if isinstance(result, BaseException):
            log.warning("asynchronous offset commit failed (%s); retried with the next commit",
                        result)
            return
        for p, o in sent.items():
            if self._uncommitted.get(p, -1) <= o:
                self._uncommitted.pop(p, None)

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
            self.commit_pending()  # what asynchronous commits may not have covered yet
        finally:
            self.producer.close(timeout=max(deadline - time.monotonic(), 0.1))
            self.consumer.close(autocommit=False)

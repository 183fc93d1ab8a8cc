"""The confluent-kafka edge's part of durable state: changelog records, restore reads, seeks,
and the transaction of exactly-once (see :class:`streamer.recovery.StateEdge`).

A mixin of :class:`streamer.confluent_edge.ConfluentEdge`, the librdkafka counterpart of
:mod:`streamer.kafka_changelog`, with the same semantics:

- at-least-once: ``commit_offsets`` commits exactly the given offsets and waits, within
  ``commit_timeout_s``, until the group's committed offsets show them (librdkafka's synchronous
  commit has no timeout: it waits for a coordinator as long as it takes);
- exactly-once: a transactional producer (``transactional.id``, ``init_transactions`` within
  the flush/drain bounds) keeps one transaction open at all times; ``commit_offsets`` adds the
  input offsets with the consumer's group metadata (KIP-447: a zombie of an older generation is
  fenced), commits the transaction and begins the next; any failure aborts it;
- ``seek`` inside an assignment becomes the start offset of the assigned partition (librdkafka
  refuses to seek a partition whose fetcher has not started), and records of a sought partition
  already handed to the batch being filled are dropped and read again from the seek.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)

from streamer.edge import ChangelogRecord, Headers, transactional_id
from streamer.errors import KafkaEdgeError, KafkaUnavailable
from streamer.events import Message
from streamer.settings import StreamerSettings

log = logging.getLogger(__name__)

_READ_SLICE_S = 0.2  # longest wait of one restore read between liveness heartbeats


# A newer producer or member took over: this one must stop (also in the edge's FATAL_CODES).
FENCED_CODES = frozenset({KafkaError._FENCED, KafkaError.PRODUCER_FENCED,
                          KafkaError.INVALID_PRODUCER_EPOCH,
                          KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED})


def _error(what: str, exc: KafkaException) -> KafkaEdgeError:
    """KafkaUnavailable when retrying can succeed, KafkaEdgeError otherwise (fatal, fenced)."""
    err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
    if err is None:
        return KafkaUnavailable(f"{what}: {exc}")
    fatal = err.fatal() or err.code() in FENCED_CODES
    cls = KafkaEdgeError if fatal else KafkaUnavailable
    return cls(f"{what}: {err.name()}: {err.str()}")


def transactional_config(settings: StreamerSettings) -> dict[str, Any]:
    """Producer settings of exactly-once under librdkafka's names (the id:
    :func:`streamer.edge.transactional_id`, the same as the kafka-python edge's)."""
    tid = transactional_id(settings)
    return {} if tid is None else {"transactional.id": tid}


class ConfluentChangelogMixin:
    settings: StreamerSettings
    topic: str
    consumer: Consumer
    producer: Producer
    beat: Callable[[], None]
    on_dropped: Callable[[int], None]
    _deadline: Callable[[float], float]
    _cap: Callable[[float], float]
    _next_offset: dict[int, int]
    _uncommitted: dict[int, int]
    _sent: int

    def _init_changelog(self, on_revoking: Callable[[set[int]], None] | None,
                        changelog_topic: str | None) -> None:
        self.on_revoking = on_revoking or (lambda partitions: None)
        self.changelog_topic = changelog_topic
        self.transactional = self.settings.processing_guarantee == "exactly_once"
        self._in_txn = False
        self._restore_consumer: Consumer | None = None
        self._assigning: set[int] | None = None  # inside an assignment: the added partitions
        self._sought: dict[int, int] = {}  # partition -> offset sought inside a rebalance

    def flush(self) -> None:
        """Wait for acks of everything sent (see ``_flush_acks``); exactly-once: a failure
        aborts the open transaction, so none of its records become visible."""
        try:
            self._flush_acks()
        except KafkaEdgeError:
            self.abort()
            raise

    def _flush_acks(self) -> None:
        raise NotImplementedError

    def _txn_timeout_s(self) -> float:
        return min(self.settings.flush_timeout_s, self.settings.drain_timeout_s)

    def _init_transactions(self) -> None:
        """Register the transactional id (fencing and aborting a predecessor's open
        transaction), within the flush/drain bound, and begin the first transaction."""
        if not self.transactional:
            return
        try:
            self.producer.init_transactions(self._txn_timeout_s())
        except KafkaException as exc:
            raise _error("init_transactions failed", exc) from exc
        self._begin()

    def _begin(self) -> None:
        if self.transactional and not self._in_txn:
            try:
                self.producer.begin_transaction()
            except KafkaException as exc:
                raise _error("begin_transaction failed", exc) from exc
            self._in_txn = True

    def abort(self, begin_next: bool = True) -> None:
        """Abort the open transaction (exactly-once): none of its records become visible to
        read_committed readers and its offsets are not committed; the next one begins unless
        ``begin_next`` is False (close). No-op otherwise."""
        if not (self.transactional and self._in_txn):
            return
        self._in_txn = False
        try:
            self.producer.abort_transaction(self._txn_timeout_s())
        except KafkaException as exc:
            log.error("aborting the transaction failed: %s", exc)
            return
        if begin_next:
            self._begin()

    def send_changelog(self, partition: int, key: bytes, value: bytes | None,
                       headers: Headers | None = None) -> None:
        """Buffer one record for changelog ``partition`` (co-partitioned with the input)."""
        assert self.changelog_topic is not None
        self._begin()
        try:
            self.producer.produce(self.changelog_topic, value, key, partition=partition,
                                  headers=headers)  # type: ignore[arg-type]
        except BufferError:  # the local queue is full: serve acks until there is room
            self._produce_when_room(self.changelog_topic, value, key, partition=partition,
                                    headers=headers)
        except KafkaException as exc:
            raise _error(f"produce to {self.changelog_topic} failed", exc) from exc
        self._sent += 1

    def _produce_when_room(self, topic: str, value: bytes | None, key: bytes | None,
                           **kwargs: Any) -> None:
        """``producer.produce(topic, value, key, **kwargs)`` again after it raised BufferError
        (librdkafka's local queue is full): serves delivery reports (``producer.poll``) and
        beats liveness until there is room, within ``flush_timeout_s`` cut to the drain
        deadline (also when ``stop`` is set meanwhile). Raises KafkaUnavailable when no room
        came in time; KafkaException as ``produce`` does."""
        deadline = self._deadline(self.settings.flush_timeout_s)
        while True:
            self.producer.poll(0.01)
            try:
                self.producer.produce(topic, value, key, **kwargs)
                return
            except BufferError:
                deadline = self._cap(deadline)  # a SIGTERM meanwhile shortens the wait
                if time.monotonic() >= deadline:
                    raise KafkaUnavailable(f"produce to {topic}: local queue full") from None
                self.beat()

    def commit_offsets(self, offsets: dict[int, int]) -> bool:
        """Commit these next-to-process offsets (a checkpoint's markers); whether the commit
        went through within ``commit_timeout_s``. Exactly-once: they join the open
        transaction, which commits (raises, after aborting it, when it cannot)."""
        tps = [TopicPartition(self.topic, p, o) for p, o in sorted(offsets.items())]
        if self.transactional:
            return self._commit_transaction(tps)
        self._uncommitted.update(offsets)  # a failed commit is retried on revocation/close
        try:
            self.consumer.commit(offsets=tps, asynchronous=True)
        except KafkaException as exc:
            log.warning("offset commit failed: %s; retried with the next checkpoint", exc)
            return False
        deadline = time.monotonic() + self.settings.commit_timeout_s
        while True:
            left = deadline - time.monotonic()
            try:
                got = self.consumer.committed(tps, timeout=max(min(left, 1.0), 0.1))
            except KafkaException as exc:
                got, why = [], str(exc)
            else:
                why = "not yet visible"
                if all(tp.offset >= offsets[tp.partition] for tp in got if tp.error is None) \
                        and not any(tp.error for tp in got):
                    for p, o in offsets.items():
                        if self._uncommitted.get(p) == o:
                            del self._uncommitted[p]
                    return True
            self.beat()
            if time.monotonic() >= deadline:
                log.warning("offset commit not confirmed within commit_timeout_s (%s); "
                            "retried with the next checkpoint", why)
                return False
            time.sleep(0.01)

    def _commit_transaction(self, tps: list[TopicPartition]) -> bool:
        self._begin()
        timeout_s = self._txn_timeout_s()
        try:
            self.producer.send_offsets_to_transaction(
                tps, self.consumer.consumer_group_metadata(), timeout_s)
            self.producer.commit_transaction(timeout_s)
        except KafkaException as exc:
            self.abort()
            raise _error("transaction commit failed (aborted)", exc) from exc
        self._in_txn = False
        self._begin()
        return True

    def topic_partitions(self, topic: str) -> int:
        """How many partitions ``topic`` has (0: it does not exist)."""
        try:
            meta = self.consumer.list_topics(
                topic, timeout=self.settings.request_timeout_ms / 1e3).topics.get(topic)
        except KafkaException as exc:
            raise _error(f"metadata of {topic}", exc) from exc
        return 0 if meta is None or meta.error is not None else len(meta.partitions)

    def seek(self, partition: int, offset: int) -> None:
        """Read input ``partition`` from ``offset`` next. Inside an assignment the offset
        becomes the partition's start offset; records of it already in the batch being
        filled are dropped (see ``_drop_sought``)."""
        self._next_offset[partition] = offset
        if self._assigning is not None:
            self._sought[partition] = offset
            if partition in self._assigning:
                return
        try:
            self.consumer.seek(TopicPartition(self.topic, partition, offset))
        except KafkaException as exc:
            raise _error(f"seek {self.topic}[{partition}] to {offset}", exc) from exc

    def _abort_after_loss(self) -> None:
        """Exactly-once, partitions lost without a revocation: the open transaction holds
        outputs of partitions that now belong to another member, so it is aborted, and the
        assignment is announced again so that every remaining partition whose state moved past
        its last checkpoint is restored and replayed (``on_assign`` restores what is not
        clean; its seeks drop records of those partitions from the batch being filled)."""
        if not (self.transactional and self._in_txn):
            return
        self.abort()
        self._assigning = set()
        try:
            self.on_assign(set(self._owned))  # type: ignore[attr-defined]
        finally:
            self._assigning = None

    def _start_offsets(self, partitions: list[TopicPartition]) -> None:
        """Give partitions being assigned the offsets sought for them meanwhile."""
        for tp in partitions:
            if tp.partition in self._sought:
                tp.offset = self._sought[tp.partition]

    def _drop_sought(self, batch: list[Message]) -> list[Message]:
        """After a rebalance inside a poll: records of partitions sought meanwhile may come
        from before the seek; drop them all (counted) and seek again, so the partition is
        read once, from the sought offset."""
        sought, self._sought = self._sought, {}
        if not sought:
            return batch
        kept = [m for m in batch if m.partition not in sought]
        if len(kept) != len(batch):
            self.on_dropped(len(batch) - len(kept))
            for p in {m.partition for m in batch} & set(sought):
                self.seek(p, sought[p])
        return kept

    def read_changelog(
        self, partitions: set[int]
    ) -> Iterator[ChangelogRecord]:
        """Every record of these changelog partitions from the log start to the high
        watermark read now, through a consumer that joins no group (assign from the
        beginning, consume until each partition reaches its end offset or its end of
        partition). Beats liveness while reading; raises KafkaUnavailable when the changelog
        cannot be read within ``request_timeout_ms``."""
        assert self.changelog_topic is not None
        if not partitions:
            return
        timeout_s = self.settings.request_timeout_ms / 1e3
        consumer = self._restore_consumer
        if consumer is None:
            from streamer.confluent_edge import librdkafka_config

            consumer = self._restore_consumer = Consumer({
                **librdkafka_config(self.settings),
                "group.id": f"{self.settings.group_id}-restore",  # required; never joined
                "client.id": f"streamer-{self.settings.group_id}-restore",
                "enable.auto.commit": False, "enable.auto.offset.store": False,
                "enable.partition.eof": True, "fetch.wait.max.ms": 10,
                "isolation.level": self.settings.isolation_level,
                "check.crcs": self.settings.check_crcs,
            })
        try:
            ends: dict[int, int] = {}
            for p in sorted(partitions):
                low, high = consumer.get_watermark_offsets(
                    TopicPartition(self.changelog_topic, p), timeout=timeout_s)
                if high > low:
                    ends[p] = high
            consumer.assign([TopicPartition(self.changelog_topic, p, OFFSET_BEGINNING)
                             for p in sorted(ends)])
            left = set(ends)
            deadline = time.monotonic() + timeout_s
            while left:
                self.beat()
                msgs = consumer.consume(10_000, timeout=_READ_SLICE_S)
                for m in msgs:
                    p, offset = m.partition() or 0, m.offset() or 0
                    err = m.error()
                    if err is not None:
                        if err.code() == KafkaError._PARTITION_EOF:
                            left.discard(p)  # read committed: may stop at an open transaction
                            continue
                        raise _error(f"reading changelog {self.changelog_topic}",
                                     KafkaException(err))
                    if p in left and offset < ends[p]:
                        yield p, m.key(), m.value(), m.headers()  # type: ignore[misc]
                    if offset + 1 >= ends.get(p, 0):
                        left.discard(p)
                if msgs:
                    deadline = time.monotonic() + timeout_s
                elif left and time.monotonic() > deadline:
                    raise KafkaUnavailable(f"changelog {self.changelog_topic} not readable "
                                           "to its end within request_timeout_ms")
        except KafkaException as exc:
            raise _error(f"reading changelog {self.changelog_topic}", exc) from exc
        finally:
            consumer.unassign()

    def _close_changelog(self) -> None:
        """Abort an open transaction (outputs not covered by a checkpoint are dropped) and
        close the restore consumer."""
        self.abort(begin_next=False)
        if self._restore_consumer is not None:
            try:
                self._restore_consumer.close()
            except (KafkaException, RuntimeError) as exc:
                log.warning("closing the restore consumer: %s", exc)


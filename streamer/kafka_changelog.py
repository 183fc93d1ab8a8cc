"""The kafka-python edge's part of durable state: changelog records, restore reads, seeks,
and the transaction of exactly-once (see :class:`streamer.recovery.StateEdge`).

A mixin of :class:`streamer.kafka_edge.KafkaEdge`, kept apart so the batch/commit logic there
stays short; a second client implements the same methods (``send_changelog``,
``commit_offsets``, ``seek``, ``read_changelog``, ``abort``) in its own module.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError
from kafka.producer.future import FutureRecordMetadata
from kafka.structs import OffsetAndMetadata

from streamer.edge import ChangelogRecord, Headers, transactional_id
from streamer.errors import KafkaUnavailable
from streamer.kafka_group import RECONNECT_BACKOFF_MAX_MS, wrap
from streamer.settings import StreamerSettings

log = logging.getLogger(__name__)


class ChangelogMixin:
    settings: StreamerSettings
    topic: str
    consumer: KafkaConsumer
    producer: KafkaProducer
    transactional: bool
    changelog_topic: str | None
    beat: Callable[[], None]
    _in_txn: bool
    _restore_consumer: KafkaConsumer | None
    _futures: list[FutureRecordMetadata]
    _sent: list[tuple[Any, object]]
    _next_offset: dict[int, int]
    _uncommitted: dict[int, int]
    _sought: dict[int, int]

    def commit_pending(self) -> bool:
        raise NotImplementedError

    @staticmethod
    def _transactional(settings: StreamerSettings) -> dict[str, Any]:
        """Producer settings of exactly-once (the id: :func:`streamer.edge.transactional_id`).
        (kafka-python sends offsets by group id only: no KIP-447 fencing by group
        generation.)"""
        tid = transactional_id(settings)
        return {} if tid is None else {"transactional_id": tid, "enable_idempotence": True}

    def _begin(self) -> None:
        if self.transactional and not self._in_txn:
            self.producer.begin_transaction()
            self._in_txn = True

    def abort(self) -> None:
        """Abort the open transaction (exactly-once): none of its records become visible to
        read_committed readers and its offsets are not committed. No-op otherwise."""
        if self.transactional and self._in_txn:
            self._in_txn = False
            self._futures, self._sent = [], []
            try:
                self.producer.abort_transaction()
            except KafkaError as exc:
                log.error("aborting the transaction failed: %s: %s", type(exc).__name__, exc)

    def send_changelog(self, partition: int, key: bytes, value: bytes | None,
                       headers: Headers | None = None) -> None:
        """Buffer one record for changelog ``partition`` (co-partitioned with the input)."""
        assert self.changelog_topic is not None
        try:
            self._begin()
            self._futures.append(self.producer.send(
                self.changelog_topic, key=key, value=value, headers=headers,
                partition=partition))
            self._sent.append(((self.changelog_topic, key, value, headers), None))
        except KafkaError as exc:
            raise wrap(f"produce to {self.changelog_topic} failed", exc) from exc

    def commit_offsets(self, offsets: dict[int, int]) -> bool:
        """Commit these next-to-process offsets (a checkpoint's markers), within
        ``commit_timeout_s``; whether the commit went through."""
        if not self.transactional:
            self._uncommitted.update(offsets)
            return self.commit_pending()
        # Exactly-once: the offsets join the open transaction, which commits everything.
        self._begin()
        tps = {TopicPartition(self.topic, p): OffsetAndMetadata(o, "", -1)
               for p, o in offsets.items()}
        try:
            self.producer.send_offsets_to_transaction(tps, self.settings.group_id)
            self.producer.commit_transaction()
        except KafkaError as exc:
            self.abort()
            raise wrap("transaction commit failed (aborted)", exc) from exc
        self._in_txn = False
        return True

    def _restorer(self) -> KafkaConsumer:
        """The group-less consumer of restores and metadata questions (made on first use)."""
        if self._restore_consumer is None:
            self._restore_consumer = KafkaConsumer(
                bootstrap_servers=self.settings.bootstrap_servers.split(","),
                enable_auto_commit=False, group_id=None,
                isolation_level=self.settings.isolation_level,
                check_crcs=self.settings.check_crcs, fetch_max_wait_ms=10,
                max_poll_records=10_000, max_partition_fetch_bytes=8 * 1024 * 1024,
                request_timeout_ms=self.settings.request_timeout_ms,
                reconnect_backoff_max_ms=RECONNECT_BACKOFF_MAX_MS,
                client_id=f"streamer-{self.settings.group_id}-restore",
                **self.settings.kafka_security_kwargs(),
            )
        return self._restore_consumer

    def topic_partitions(self, topic: str) -> int:
        """How many partitions ``topic`` has (0: it does not exist). Asked through the
        group-less consumer: a full metadata fetch on the group's consumer would leave its
        subscription blind to an input topic created later."""
        try:
            return len(self._restorer().partitions_for_topic(topic) or ())
        except KafkaError as exc:
            raise wrap(f"metadata of {topic}", exc) from exc

    def seek(self, partition: int, offset: int) -> None:
        """Read input ``partition`` from ``offset`` next; records of it already fetched into
        the batch being filled are dropped (they are read again from there)."""
        self.consumer.seek(TopicPartition(self.topic, partition), offset)
        self._next_offset[partition] = offset
        self._sought[partition] = offset

    def read_changelog(
        self, partitions: set[int]
    ) -> Iterator[ChangelogRecord]:
        """Every record of these changelog partitions from the log start to the high
        watermark read now, through a group-less consumer (assign, seek_to_beginning, poll
        until each position reaches its end offset). Beats liveness while reading; raises
        KafkaUnavailable when the changelog cannot be read within ``request_timeout_ms``."""
        assert self.changelog_topic is not None
        if not partitions:
            return
        consumer = self._restorer()
        tps = [TopicPartition(self.changelog_topic, p) for p in sorted(partitions)]
        try:
            consumer.assign(tps)
            ends = consumer.end_offsets(tps)
            consumer.seek_to_beginning(*tps)
            left = {tp for tp in tps if consumer.position(tp) < ends[tp]}
            deadline = time.monotonic() + self.settings.request_timeout_ms / 1e3
            while left:
                self.beat()
                got = consumer.poll(timeout_ms=200)
                for tp, msgs in got.items():
                    for m in msgs:
                        if m.offset < ends[tp]:
                            yield tp.partition, m.key, m.value, list(m.headers or [])
                    deadline = time.monotonic() + self.settings.request_timeout_ms / 1e3
                left = {tp for tp in left if consumer.position(tp) < ends[tp]}
                if left and time.monotonic() > deadline:
                    raise KafkaUnavailable(f"changelog {self.changelog_topic} not readable "
                                           f"to its end within request_timeout_ms")
        except KafkaError as exc:
            raise wrap(f"reading changelog {self.changelog_topic}", exc) from exc
        finally:
            consumer.assign([])

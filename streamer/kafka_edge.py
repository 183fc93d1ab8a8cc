"""The Kafka edge (kafka-python): batches in, predictions and dead letters out, commits after acks.

At-least-once is the contract: offsets of a batch are committed only once every record the
batch produced (predictions and dead letters) has been acknowledged by the broker. A crash
before that re-delivers the batch; nothing is ever skipped silently. Offset gaps that lost data
(the broker's retention deleted what a lagging consumer had not read) are counted and logged
loudly; gaps left by transaction markers or compaction are not losses and are not counted.

Faults are split in two. Transient ones (a broker or the group coordinator down, request
timeouts, a commit rejected by a rebalance) raise :class:`KafkaUnavailable`: the caller backs
off and polls again, and unacknowledged work is re-delivered. Anything else (bad credentials,
an unknown topic, a fenced static member) raises :class:`KafkaEdgeError` and ends the service.

Offsets of a batch are committed asynchronously once its acks are in (one commit in flight at a
time; its result arrives inside a later ``consumer.poll()``): the coordinator round trip is off
the loop's critical path. Commits on revocation, of checkpoint markers and on close stay
synchronous and bounded.

Usage::

    edge = KafkaEdge(settings, on_assign=..., on_revoke=...)
    batch = edge.poll()                        # list[Message] (possibly empty)
    edge.send(topic, key, value, headers)      # buffered
    edge.flush_and_commit(batch)               # wait for acks, then commit (asynchronously)
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
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

from streamer.edge import EdgeBase, Headers, PartitionCallback, Record, RefusedCallback
from streamer.errors import KafkaEdgeError, KafkaUnavailable
from streamer.events import Message
from streamer.kafka_append import appender
from streamer.kafka_changelog import ChangelogMixin
from streamer.kafka_group import (
    ASSIGNORS,
    MEMBERSHIP_ERRORS,
    RECONNECT_BACKOFF_MAX_MS,
    RebalanceListener,
    generation_gone,
    is_transient,
    wrap,
)
from streamer.settings import StreamerSettings

log = logging.getLogger(__name__)

# Refusals of the record itself (size, format, policy): sending it again cannot succeed.
REFUSED = (MessageSizeTooLargeError, RecordListTooLargeError, InvalidRecordError,
           CorruptRecordError, PolicyViolationError)

COORDINATOR_GRACE_S = 2.0  # finding the coordinator at start or after a move takes a moment


class KafkaEdge(ChangelogMixin, EdgeBase):
    """One consumer-group member and one producer.

    ``stop`` (optional) is the service's stop event: once it is set, every wait is cut to what
    is left of ``drain_timeout_s``. ``beat`` is called at least every 0.5 s while a wait blocks,
    so liveness reflects a loop that waits on purpose, not one that is stuck.
    """

    CLIENT_ERRORS = (KafkaError,)

    def __init__(
        self,
        settings: StreamerSettings,
        on_assign: PartitionCallback,
        on_revoke: PartitionCallback,
        on_gap: Callable[[int, int], None] | None = None,
        consumer: KafkaConsumer | None = None,
        producer: KafkaProducer | None = None,
        on_dropped: Callable[[int], None] | None = None,
        on_commit_failed: Callable[[str], None] | None = None,
        stop: threading.Event | None = None,
        beat: Callable[[], None] | None = None,
        on_stall: Callable[[str], None] | None = None,
        on_refused: RefusedCallback | None = None,
        on_revoking: PartitionCallback | None = None,
        changelog_topic: str | None = None,
        on_committed: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(settings, on_assign, on_revoke, on_gap, on_dropped, on_commit_failed,
                         on_committed, stop, beat, on_stall)
        self.transactional = settings.processing_guarantee == "exactly_once"
        self.generation = 0  # bumped by every rebalance callback
        self.rebalancing = False  # partitions revoked, new assignment not yet known
        self._unacked = False  # a flush gave up with records still unacknowledged
        self._coordinator_missing_since: float | None = None
        self.on_refused = on_refused
        self.on_revoking = on_revoking or (lambda partitions: None)
        self.changelog_topic = changelog_topic
        self._restore_consumer: KafkaConsumer | None = None
        self._sought: dict[int, int] = {}  # partition -> offset sought by an assignment
        try:
            self.consumer, self.producer = self._clients(
                settings, consumer, producer, self._transactional(settings))
            self._in_txn = False
            if self.transactional:
                self.producer.init_transactions()
        except KafkaError as exc:  # e.g. NoBrokersAvailable: the service retries the start
            raise wrap(f"cannot connect to {settings.bootstrap_servers}", exc) from exc
        self._append = appender(self.producer)  # kafka-python's send() minus its checks
        self._futures: list[FutureRecordMetadata] = []
        self._sent: list[tuple[Record, object]] = []  # what each future sent, and its origin
        self._partitions: dict[str, tuple[list[int], dict[bytes, int]]] = {}
        self._commit_sent: tuple[int, float] | None = None  # async commit in flight: id, sent at
        self._commit_ids = 0
        self._commits_ok = 0  # async commits that succeeded since flush_and_commit last returned
        self._dropped: set[int] = set()  # partitions whose acked offsets a rejected commit dropped
        self._commit_error: KafkaEdgeError | None = None  # an async commit failed for good
        self.consumer.subscribe([self.topic], listener=RebalanceListener(self))

    @staticmethod
    def _clients(
        settings: StreamerSettings, consumer: KafkaConsumer | None,
        producer: KafkaProducer | None, transactional: dict[str, Any],
    ) -> tuple[KafkaConsumer, KafkaProducer]:
        security = settings.kafka_security_kwargs()
        consumer = consumer or KafkaConsumer(
            bootstrap_servers=settings.bootstrap_servers.split(","),
            group_id=settings.group_id,
            group_instance_id=settings.group_instance_id,
            partition_assignment_strategy=(ASSIGNORS[settings.partition_assignor],),
            session_timeout_ms=settings.session_timeout_ms,
            heartbeat_interval_ms=settings.heartbeat_interval_ms,
            max_poll_interval_ms=settings.max_poll_interval_ms,
            request_timeout_ms=settings.request_timeout_ms,
            isolation_level=settings.isolation_level,
            reconnect_backoff_max_ms=RECONNECT_BACKOFF_MAX_MS,
            check_crcs=settings.check_crcs,
            enable_auto_commit=False,
            auto_offset_reset=settings.auto_offset_reset,
            fetch_max_wait_ms=settings.fetch_max_wait_ms,
            max_poll_records=settings.max_batch_events,
            metrics_enabled=False,  # its sensors cost ~10% of the loop; we export our own
            client_id=f"streamer-{settings.group_id}",
            **security,
        )
        try:
            producer = producer or KafkaProducer(
                bootstrap_servers=settings.bootstrap_servers.split(","),
                acks="all",
                # Every batch ends with a flush, which sends at once: lingering only keeps the
                # sender thread from waking (and taking the GIL) while a batch is being sent.
                linger_ms=100,
                batch_size=256 * 1024,
                # One request in flight keeps a key's predictions in order across retries.
                max_in_flight_requests_per_connection=1,
                request_timeout_ms=settings.request_timeout_ms,
                reconnect_backoff_max_ms=RECONNECT_BACKOFF_MAX_MS,
                max_request_size=settings.max_request_size,
                # send(), partitions_for() and init_transactions() block on metadata or a full
                # buffer for max_block_ms (kafka-python: 60 s): keep that inside our bounds.
                max_block_ms=int(min(settings.flush_timeout_s, settings.drain_timeout_s) * 1e3),
                compression_type=(None if settings.output_compression == "none"
                                  else settings.output_compression),
                metrics_enabled=False,
                client_id=f"streamer-{settings.group_id}-out",
                **transactional,
                **security,
            )
        except BaseException:
            consumer.close(autocommit=False)
            raise
        return consumer, producer

    # --- consuming -------------------------------------------------------------------------

    def poll(self) -> list[Message]:
        """Up to ``max_batch_events`` records gathered within ``max_batch_wait_ms``: fetching
        goes on until the batch is full, the time is up or the records reach the high watermark
        of their last fetch (everything the broker had was taken: waiting longer would only add
        latency when traffic is light; when behind, batches keep filling, which amortizes the
        per-batch cost and catches up). Returns an empty list when nothing came (so the loop
        can heartbeat and swap models while idle).

        kafka-python runs a pending rebalance inside ``consumer.poll()`` and then resets every
        position to the committed offset. When that happens during the fill, the batch keeps
        only records of partitions still assigned (the others are dropped and counted: their
        new owner reads them from the committed offset) and each kept partition is sought to
        just after its last kept record, so no offset is read twice; records fetched after the
        rebalance are handed back by seeking, so a batch never mixes the two generations.

        Raises KafkaUnavailable when the group coordinator cannot be reached (retry later),
        KafkaEdgeError for anything that retrying cannot fix.
        """
        limit, wait_s = self.settings.max_batch_events, self.settings.max_batch_wait_ms / 1e3
        self._raise_commit_error()
        if self.changelog_topic is None:  # with a changelog only checkpoints commit
            self.commit_async()  # e.g. a commit that failed earlier, retried while idle
        batch: list[Message] = []
        generation = self.generation
        self._sought = {}
        deadline = time.monotonic() + wait_s
        while len(batch) < limit:
            remaining_ms = max(int((deadline - time.monotonic()) * 1e3), 0)
            try:
                records = self.consumer.poll(timeout_ms=remaining_ms,
                                             max_records=limit - len(batch))
            except KafkaError as exc:
                raise wrap("poll failed", exc) from exc
            self._raise_commit_error()
            if self.generation != generation:
                if self.rebalancing and remaining_ms > 0:
                    continue  # revoked, not yet re-assigned: nothing fetched now is ours
                return self._after_rebalance(batch, records)
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
        if batch or not self._coordinator_unknown():
            self._coordinator_missing_since = None
        elif self._coordinator_missing_since is None:
            self._coordinator_missing_since = time.monotonic()
        elif time.monotonic() - self._coordinator_missing_since > COORDINATOR_GRACE_S:
            raise KafkaUnavailable("the group coordinator is unavailable")
        return batch

    def _after_rebalance(self, before: list[Message], after: dict[Any, list[Any]]) -> list[Message]:
        owned = set() if self.rebalancing else self.assigned_partitions() - set(self._sought)
        kept = [m for m in before if m.partition in owned]
        dropped = len(before) - len(kept)
        if dropped:
            self.on_dropped(dropped)
            log.warning("rebalance during a batch: dropped %d records of partitions not "
                        "assigned to this member (now or yet); whoever owns them next reads "
                        "them from the committed offset", dropped)
        resume: dict[int, int] = {}
        for tp, msgs in after.items():
            if msgs and tp.partition in owned:
                resume[tp.partition] = msgs[0].offset
        for m in kept:
            resume[m.partition] = m.offset + 1
        resume.update(self._sought)  # restored state starts there: re-read from it
        for partition, offset in resume.items():
            self.consumer.seek(TopicPartition(self.topic, partition), offset)
            self._next_offset[partition] = offset
        return kept

    def _coordinator_unknown(self) -> bool:
        coordinator = getattr(self.consumer, "_coordinator", None)
        check = getattr(coordinator, "coordinator_unknown", None)
        return bool(check()) if callable(check) else False

    def _seek_input(self, partition: int, offset: int) -> None:
        self.consumer.seek(TopicPartition(self.topic, partition), offset)

    def _committed_offset(self, partition: int) -> int | None:
        try:
            return self.consumer.committed(
                TopicPartition(self.topic, partition),
                timeout_ms=int(self.settings.commit_timeout_s * 1e3))
        except KafkaError as exc:
            log.warning("cannot read the committed offset of %s[%d]: %s", self.topic,
                        partition, exc)
            return None

    def _log_start(self, partition: int) -> int | None:
        tp = TopicPartition(self.topic, partition)
        fetcher = getattr(self.consumer, "_fetcher", None)
        timeout_ms = int(self.settings.commit_timeout_s * 1e3)
        if fetcher is not None and hasattr(fetcher, "beginning_offsets"):
            offsets = fetcher.beginning_offsets([tp], timeout_ms)
        else:
            offsets = self.consumer.beginning_offsets([tp])
        return offsets.get(tp)

    # --- producing and committing ----------------------------------------------------------

    def send(
        self, topic: str, key: bytes | None, value: bytes | None,
        headers: Headers | None = None, origin: object = None,
    ) -> None:
        """Buffer one record; ``origin`` (e.g. the input message) is handed to ``on_refused``
        if the producer or the broker refuses this record. A keyed record goes straight to the
        producer's accumulator (:mod:`streamer.kafka_append`), others through ``send()``."""
        try:
            if self.transactional:
                self._begin()
            partition = self._partition(topic, key)
            future = None
            if partition is not None and self._append is not None:
                future = self._append(topic, partition, key, value, headers)  # type: ignore[arg-type]
            if future is None:
                future = self.producer.send(topic, key=key, value=value, headers=headers,
                                            partition=partition)
            self._futures.append(future)
            self._sent.append(((topic, key, value, headers), origin))
        except KafkaError as exc:
            raise wrap(f"produce to {topic} failed", exc) from exc

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

    def flush_and_commit(self, batch: Sequence[Message]) -> bool:
        """Wait until the broker acknowledged every record sent for ``batch``, then commit its
        offsets asynchronously (:meth:`commit_async`).

        Returns whether an offset commit succeeded since the previous call (results of
        asynchronous commits arrive inside ``poll``); always False when ``on_committed`` is
        given, which then hears of each success as it arrives, also while idle. A commit
        rejected because the group moved on drops the offsets it carried (the new owner
        re-reads them); one that failed otherwise keeps them for the next commit; both are
        reported through ``on_commit_failed``. Raises KafkaUnavailable, after seeking the
        batch's partitions back, when the acks do not come within ``flush_timeout_s``.
        """
        try:
            self.flush()
        except KafkaEdgeError:
            self.rewind(batch)
            raise
        for msg in batch:
            self._uncommitted[msg.partition] = max(
                self._uncommitted.get(msg.partition, 0), msg.offset + 1
            )
        self.commit_async()
        self._raise_commit_error()
        succeeded, self._commits_ok = self._commits_ok > 0, 0
        return succeeded and self.on_committed is None

    def flush(self) -> None:
        """Wait for acks of everything sent, at most ``flush_timeout_s`` (less when draining),
        beating the heartbeat meanwhile. Exactly-once: a failure aborts the transaction."""
        try:
            self._flush_acks()
        except (KafkaEdgeError, KafkaError):
            self.abort()
            raise

    def _flush_acks(self) -> None:
        futures, self._futures = self._futures, []  # on failure the batch is re-sent anyway
        sent, self._sent = self._sent, []
        if not futures:
            return
        exc = self._wait_acks(self._flush_slice)
        if exc is not None:
            self._unacked = True
            pending = sum(1 for f in futures if not f.is_done)
            raise KafkaUnavailable(
                f"{pending} of {len(futures)} records not acknowledged in time "
                f"({type(exc).__name__}); offsets not committed, the batch will be re-delivered"
            ) from exc
        self._unacked = False  # flush() covers everything sent so far
        failed = [f for f in futures if f.failed()]
        if failed and self.on_refused is not None:
            failed = self._replace_refused(futures, sent)
        if failed:
            error = failed[0].exception
            cls = KafkaUnavailable if is_transient(error) else KafkaEdgeError
            raise cls(
                f"{len(failed)} of {len(futures)} records were not acknowledged: "
                f"{type(error).__name__}: {error}; offsets not committed, the batch will be "
                "re-delivered"
            )

    def _flush_slice(self, timeout_s: float) -> KafkaError | None:
        """One slice of the flush wait: None once everything sent is acknowledged, else
        kafka-python's timeout error."""
        try:
            self.producer.flush(timeout=max(timeout_s, 0.001))
        except KafkaError as exc:  # KafkaTimeoutError: not all acked within this slice
            return exc
        return None

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
            timeout_s = self._deadline(self.settings.flush_timeout_s) - time.monotonic()
            try:
                self.producer.flush(timeout=max(timeout_s, 0.001))
            except KafkaError as exc:
                raise KafkaUnavailable(
                    f"replacements of refused records not acknowledged in time "
                    f"({type(exc).__name__}); offsets not committed, the batch will be re-delivered"
                ) from exc
        for replacement, origin, future in retried:
            if future.failed():
                if isinstance(future.exception, REFUSED):
                    self.on_refused(replacement, origin, future.exception, True)
                else:
                    transient.append(future)
        return transient

    def commit_pending(self) -> bool:
        """Commit acknowledged offsets synchronously within ``commit_timeout_s`` (revocation,
        checkpoint markers, close); returns whether a commit was made. Never raises for a
        transient fault: a rejected commit is counted."""
        if not self._uncommitted:
            return False
        offsets = {
            TopicPartition(self.topic, p): OffsetAndMetadata(o, "", -1)
            for p, o in self._uncommitted.items()
        }
        timeout_s = max(self._deadline(self.settings.commit_timeout_s) - time.monotonic(), 0.1)
        try:
            self.consumer.commit(offsets, timeout_ms=int(timeout_s * 1e3))
        except MEMBERSHIP_ERRORS as exc:
            self._commit_rejected(exc, list(self._uncommitted))
            return False
        except KafkaError as exc:
            if not is_transient(exc):
                raise KafkaEdgeError(f"commit failed: {type(exc).__name__}: {exc}") from exc
            self.on_commit_failed("timeout")
            log.warning("offset commit failed (%s: %s); retried with the next commit",
                        type(exc).__name__, exc)
            return False
        self._dropped -= {tp.partition for tp in offsets}
        self._uncommitted.clear()
        return True

    def forget(self, partitions: set[int]) -> None:
        super().forget(partitions)
        self._dropped -= partitions  # their next owner re-reads them: a normal hand-over

    def commit_async(self) -> None:
        """Send the acknowledged offsets to the group coordinator without waiting; the result
        comes to :meth:`_on_commit` inside a later ``consumer.poll()``. One commit is in flight
        at a time (offsets acknowledged meanwhile go with the next one), so commits reach the
        coordinator in order and never pile up; one without an answer within
        ``commit_timeout_s`` counts as timed out and the next may go. Nothing is sent while
        partitions are revoked and not yet re-assigned (the revocation commits synchronously).
        """
        if not self._uncommitted or self.rebalancing:
            return
        now = time.monotonic()
        if self._commit_sent is not None:
            if now - self._commit_sent[1] < self.settings.commit_timeout_s:
                return
            self._commit_sent = None
            self.on_commit_failed("timeout")
            log.warning("offset commit unanswered for %.0f s; retried with the next commit",
                        self.settings.commit_timeout_s)
        offsets = {
            TopicPartition(self.topic, p): OffsetAndMetadata(o, "", -1)
            for p, o in self._uncommitted.items()
        }
        self._commit_ids += 1
        self._commit_sent = (self._commit_ids, now)
        try:
            self.consumer.commit_async(offsets, callback=functools.partial(
                self._on_commit, self._commit_ids))
        except KafkaError as exc:  # e.g. fenced by a newer static member (raised at once)
            self._on_commit(self._commit_ids, offsets, exc)

    def _on_commit(self, commit_id: int, offsets: dict[TopicPartition, OffsetAndMetadata],
                   result: object) -> None:
        """An asynchronous commit's result (kafka-python: None or a response on success, an
        exception instance or class on failure)."""
        current = self._commit_sent is not None and self._commit_sent[0] == commit_id
        if current:
            self._commit_sent = None
        error = (result() if isinstance(result, type) and issubclass(result, BaseException)
                 else result)
        if not isinstance(error, BaseException):
            for tp, meta in offsets.items():
                if self._uncommitted.get(tp.partition, -1) <= meta.offset:
                    self._uncommitted.pop(tp.partition, None)
                self._dropped.discard(tp.partition)
            self._commits_ok += 1
            if self.on_committed is not None:
                self.on_committed()
            return
        # Whether this failure left anything uncommitted (a later synchronous commit may have
        # covered its offsets already); a commit given up on as timed out was reported then.
        pending = [tp.partition for tp in offsets if tp.partition in self._uncommitted]
        if not current or not pending:
            return
        if isinstance(error, MEMBERSHIP_ERRORS):
            self._commit_rejected(error, pending)
        elif is_transient(error):
            self.on_commit_failed("timeout")
            log.warning("offset commit failed (%s: %s); retried with the next commit",
                        type(error).__name__, error)
        else:
            self._commit_error = KafkaEdgeError(f"commit failed: {type(error).__name__}: {error}")

    def _commit_rejected(self, error: BaseException, partitions: list[int]) -> None:
        """A commit the group refused: with the member's generation gone the offsets of
        ``partitions`` are dropped (their next owner re-reads them); while a rebalance is only
        in progress they stay pending for the next commit (the member may keep them)."""
        self.on_commit_failed("rebalance")
        if generation_gone(error):
            for p in partitions:
                self._uncommitted.pop(p, None)
            self._dropped.update(partitions)
            log.warning("offset commit rejected (%s: %s): the group rebalanced; those offsets "
                        "will be re-delivered", type(error).__name__, error)
        else:
            log.warning("offset commit rejected while the group rebalances (%s: %s); retried "
                        "with the next commit", type(error).__name__, error)

    def _raise_commit_error(self) -> None:
        if self._commit_error is not None:
            raise self._commit_error

    # --- state -----------------------------------------------------------------------------

    def assigned_partitions(self) -> set[int]:
        return {tp.partition for tp in self.consumer.assignment()}

    def lag(self) -> dict[tuple[str, int], float] | None:
        """Per assigned partition, messages between our position and the log end now (one
        ListOffsets round trip, at most 2 s). None when the log end cannot be read: the caller
        marks its values stale rather than showing a number that may be too low."""
        positions: dict[TopicPartition, int] = {}
        for tp in self.consumer.assignment():
            try:
                position = self.consumer.position(tp, timeout_ms=0)
            except (KafkaError, AssertionError):  # unassigned meanwhile
                position = None
            if position is not None:
                positions[tp] = position
        if not positions:
            return {}
        try:
            fetcher = getattr(self.consumer, "_fetcher", None)
            if fetcher is not None and hasattr(fetcher, "end_offsets"):
                ends = fetcher.end_offsets(list(positions), 2000)
            else:
                ends = self.consumer.end_offsets(list(positions))
        except KafkaError as exc:
            log.debug("cannot read log end offsets: %s", exc)
            return None
        return {
            (tp.topic, tp.partition): float(max(ends[tp] - pos, 0))
            for tp, pos in positions.items() if tp in ends
        }

    def close(self) -> bool:
        """Flush what is buffered, commit it, leave the group, all within the drain deadline
        (``drain_timeout_s`` from the first wait after ``stop`` was set). Returns whether
        everything sent was acknowledged and committed. Safe to call twice."""
        self.stop.set()
        deadline = self._deadline(self.settings.drain_timeout_s)
        clean = True
        try:
            try:
                self.flush()
                self.abort()  # exactly-once: outputs not covered by a checkpoint are dropped
                if self._unacked:  # records of an earlier, abandoned flush
                    self.producer.flush(timeout=max(deadline - time.monotonic(), 0.001))
                    self._unacked = False
            except KafkaError as exc:
                clean = False
                log.error("drain: records still unacknowledged: %s: %s", type(exc).__name__,
                          exc)
            except KafkaEdgeError as exc:
                clean = False
                log.error("drain: %s", exc)
            # A commit that times out (coordinator away) is tried again until the drain
            # deadline, so a broker back within drain_timeout_s still gets our offsets.
            committed = not self._uncommitted
            while not committed and self._uncommitted and time.monotonic() < deadline:
                committed = self.commit_pending()
                if not committed and self._uncommitted:
                    time.sleep(min(0.2, max(deadline - time.monotonic(), 0.0)))
            if self._dropped:  # acknowledged offsets a rejected commit dropped, never committed
                committed = False
                log.error("drain: offsets of partitions %s were dropped by a commit the group "
                          "rejected and not committed since; they will be re-delivered",
                          sorted(self._dropped))
            clean = clean and committed
        finally:
            try:
                self._close_producer(max(deadline - time.monotonic(), 0.1))
            finally:
                if self._restore_consumer is not None:
                    self._restore_consumer.close(autocommit=False)
                self.consumer.close(autocommit=False,
                                    timeout_ms=int(max(deadline - time.monotonic(), 0.1) * 1e3))
        return clean

    def _close_producer(self, timeout_s: float) -> None:
        try:
            self.producer.close(timeout=timeout_s)
        except KafkaError as exc:
            # kafka-python's close() flushes first and raises when records are still
            # unacknowledged, leaving its sender thread running: stop that thread regardless.
            log.error("closing the producer with records unacknowledged: %s", exc)
            sender = getattr(self.producer, "_sender", None)
            if sender is not None:
                sender.force_close()
            self.producer._closed = True  # its __del__ would try (and fail) again

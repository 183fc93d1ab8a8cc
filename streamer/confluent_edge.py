"""The Kafka edge on confluent-kafka (librdkafka): ``--kafka-client confluent``.

Same contract as :mod:`streamer.kafka_edge` (see :class:`streamer.edge.Edge`): offsets are
committed only after every output of their batch was acknowledged; a batch never mixes records
from before and after a rebalance; transient faults raise ``KafkaUnavailable`` and every wait is
bounded. What differs is how librdkafka works:

- fetching runs in librdkafka's own threads, so :meth:`poll` waits for the first record and then
  takes only what is already queued: at light load a batch is handed over as soon as it arrives,
  at full speed it fills to ``max_batch_events`` without waiting;
- rebalance callbacks run inside ``poll()``/``consume()``. With the default ``sticky`` assignor
  the protocol is incremental cooperative (``cooperative-sticky``): only moved partitions are
  revoked, and records of a revoked partition are dropped from the batch being filled (their
  new owner reads them from the committed offset). With eager assignors (``range``,
  ``roundrobin``) a partition that comes back resumes after the last record already read;
- offsets are committed asynchronously after the batch's acks (the result arrives in a later
  ``poll``; a failed commit puts its offsets back for the next one); a sync commit happens on
  revocation and on close;
- keys go to the same partitions as with kafka-python (``partitioner=murmur2_random``, the Java
  default), and the producer is idempotent, which keeps a key's outputs in order across retries.
- durable state and exactly-once (changelog writes, restore reads, seeks, transactions) are in
  :mod:`streamer.confluent_changelog`.

Usage::

    edge = ConfluentEdge(settings, on_assign=..., on_revoke=...)
    batch = edge.poll()
    edge.send(topic, key, value, headers)
    edge.flush_and_commit(batch)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from itertools import repeat
from operator import is_not
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from streamer.confluent_changelog import (
    FENCED_CODES,
    ConfluentChangelogMixin,
    transactional_config,
)
from streamer.edge import EdgeBase, Headers, PartitionCallback, Record, RefusedCallback
from streamer.errors import ConfigError, KafkaEdgeError, KafkaUnavailable
from streamer.events import Message
from streamer.settings import StreamerSettings

log = logging.getLogger(__name__)


_IDLE_COMMIT_S = 1.0  # while idle, pending offsets are committed again at most this often
_IDLE_POLL_S = 0.1  # longest wait for a first record; the loop heartbeats in between
ASSIGNORS = {"sticky": "cooperative-sticky", "range": "range", "roundrobin": "roundrobin"}
# Errors retrying cannot fix: settings, credentials or the data must change first.
FATAL_CODES = {
    KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.GROUP_AUTHORIZATION_FAILED,
    KafkaError.CLUSTER_AUTHORIZATION_FAILED, KafkaError.SASL_AUTHENTICATION_FAILED,
    KafkaError._AUTHENTICATION, KafkaError._INVALID_ARG, KafkaError.INVALID_CONFIG,
    KafkaError.UNSUPPORTED_VERSION, KafkaError.UNSUPPORTED_SASL_MECHANISM,
    KafkaError.INVALID_GROUP_ID, KafkaError.INVALID_SESSION_TIMEOUT, KafkaError.TOPIC_EXCEPTION,
    KafkaError.FENCED_INSTANCE_ID, KafkaError.MSG_SIZE_TOO_LARGE, KafkaError._FATAL,
    *FENCED_CODES,
}
# Refusals of the record itself (size, format, policy): sending it again cannot succeed.
REFUSED_CODES = {
    KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.INVALID_RECORD, KafkaError.POLICY_VIOLATION,
    KafkaError.RECORD_LIST_TOO_LARGE, KafkaError.INVALID_MSG, KafkaError.INVALID_MSG_SIZE,
}
# The group moved on: the pending offsets are no longer ours to commit.
MEMBERSHIP_CODES = {
    KafkaError.REBALANCE_IN_PROGRESS, KafkaError.ILLEGAL_GENERATION,
    KafkaError.UNKNOWN_MEMBER_ID, KafkaError._ASSIGNMENT_LOST, KafkaError._STATE,
}
# Commit errors after which this member can no longer commit those offsets (retrying is futile).
GENERATION_GONE = {
    KafkaError.ILLEGAL_GENERATION, KafkaError.UNKNOWN_MEMBER_ID, KafkaError._ASSIGNMENT_LOST,
}


def is_transient(err: KafkaError) -> bool:
    """Whether retrying later can succeed: every librdkafka error except fatal ones and those
    in FATAL_CODES (a setting, a credential or a record to fix)."""
    return not err.fatal() and err.code() not in FATAL_CODES


def _raise(what: str, err: KafkaError) -> None:
    cls = KafkaUnavailable if is_transient(err) else KafkaEdgeError
    raise cls(f"{what}: {err.name()}: {err.str()}")


def librdkafka_config(settings: StreamerSettings) -> dict[str, Any]:
    """Connection and security settings under librdkafka's names (shared by both clients)."""
    conf: dict[str, Any] = {"bootstrap.servers": settings.bootstrap_servers,
                            "security.protocol": settings.security_protocol.lower()}
    if settings.sasl_mechanism == "OAUTHBEARER":
        raise ConfigError("sasl_mechanism", "OAUTHBEARER is only supported with "
                          "kafka_client=kafka-python")
    names = {"sasl_mechanism": "sasl.mechanism", "sasl_username": "sasl.username",
             "sasl_password": "sasl.password", "ssl_cafile": "ssl.ca.location",
             "ssl_certfile": "ssl.certificate.location", "ssl_keyfile": "ssl.key.location",
             "ssl_key_password": "ssl.key.password"}
    for field, name in names.items():
        value = getattr(settings, field, None)
        if value is None:
            continue
        secret = getattr(value, "get_secret_value", None)
        conf[name] = secret() if callable(secret) else str(value)
    if not settings.ssl_check_hostname:
        conf["ssl.endpoint.identification.algorithm"] = "none"
    return conf


def _messages(msgs: list[Any]) -> list[Message]:
    """librdkafka records (no errors among them) as Messages, a field at a time in C loops
    (``tuple.__new__(Message, fields)`` is what ``Message._make`` does, without its Python
    frame)."""
    if not msgs:
        return []
    kind = type(msgs[0])
    fields = zip(map(kind.key, msgs), map(kind.value, msgs), map(kind.partition, msgs),
                 map(kind.offset, msgs), strict=True)
    return list(map(tuple.__new__, repeat(Message), fields))


class ConfluentEdge(ConfluentChangelogMixin, EdgeBase):
    """One consumer-group member and one idempotent producer on librdkafka.

    ``stop`` (optional) is the service's stop event: once set, waits are cut to what is left of
    ``drain_timeout_s``; ``beat`` is called at least every 0.5 s while a wait blocks.
    """

    CLIENT_ERRORS = (KafkaException,)

    def __init__(
        self,
        settings: StreamerSettings,
        on_assign: PartitionCallback,
        on_revoke: PartitionCallback,
        on_gap: Callable[[int, int], None] | None = None,
        on_dropped: Callable[[int], None] | None = None,
        on_commit_failed: Callable[[str], None] | None = None,
        stop: threading.Event | None = None,
        beat: Callable[[], None] | None = None,
        on_refused: RefusedCallback | None = None,
        on_stall: Callable[[str], None] | None = None,
        on_revoking: PartitionCallback | None = None,
        changelog_topic: str | None = None,
        on_committed: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(settings, on_assign, on_revoke, on_gap, on_dropped, on_commit_failed,
                         on_committed, stop, beat, on_stall)
        self.on_refused = on_refused
        self._refused: list[tuple[Record, object, KafkaError, bool]] = []
        # (topic, key, value, origin, final) of records sent since the last flush
        self._pending: list[tuple[str, bytes | None, bytes | None, object, bool]] = []
        self.generation = 0  # bumped by every rebalance callback
        self._owned: set[int] = set()
        self._eager_revoked: set[int] = set()
        self._sent = 0
        self._commit_issued = 0.0  # time.monotonic() of the last commit issued
        self._last_commit_error: int | None = None  # the last commit's error code, if any
        self._failures: list[KafkaError] = []
        self._init_changelog(on_revoking, changelog_topic)
        base = librdkafka_config(settings)
        assignor = ASSIGNORS[settings.partition_assignor]
        self._cooperative = assignor == "cooperative-sticky"
        consumer_conf: dict[str, Any] = {
            **base,
            "group.id": settings.group_id,
            "client.id": f"streamer-{settings.group_id}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": settings.auto_offset_reset,
            "fetch.wait.max.ms": settings.fetch_max_wait_ms,
            "partition.assignment.strategy": assignor,
            "isolation.level": settings.isolation_level,
            "session.timeout.ms": 10_000,  # kafka-python's default (librdkafka's is 45 s)
            "on_commit": self._on_commit,
            "error_cb": self._on_error,
        }
        optional = {"session_timeout_ms": "session.timeout.ms",
                    "heartbeat_interval_ms": "heartbeat.interval.ms",
                    "max_poll_interval_ms": "max.poll.interval.ms",
                    "group_instance_id": "group.instance.id", "check_crcs": "check.crcs"}
        for field, name in optional.items():
            value = getattr(settings, field, None)
            if value is not None:
                consumer_conf[name] = value
        producer_conf: dict[str, Any] = {
            **base,
            "client.id": f"streamer-{settings.group_id}-out",
            "acks": "all",
            "enable.idempotence": True,  # in order across retries, several requests in flight
            "linger.ms": 1,
            "partitioner": "murmur2_random",  # the Java/kafka-python default: same partitions
            "on_delivery": self._delivered,
            "delivery.report.only.error": True,  # no Python call per acknowledged record
            "error_cb": self._on_error,
            **transactional_config(settings),
        }
        if settings.output_compression not in (None, "none"):
            producer_conf["compression.type"] = settings.output_compression
        producer_conf["message.max.bytes"] = settings.max_request_size
        producer_conf["request.timeout.ms"] = settings.request_timeout_ms
        self._fatal: KafkaError | None = None
        self._all_down = False  # librdkafka reported every broker down; cleared once one answers
        try:
            self.consumer = Consumer(consumer_conf)
            self.producer = Producer(producer_conf)
        except KafkaException as exc:
            raise KafkaEdgeError(f"bad Kafka client configuration: {exc}") from exc
        self._init_transactions()
        self.consumer.subscribe([self.topic], on_assign=self._assigned, on_revoke=self._revoked,
                                on_lost=self._lost)

    # --- rebalance callbacks (inside consumer.poll/consume) ---------------------------------

    def _assigned(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.generation += 1
        added = {tp.partition for tp in partitions}
        if not self._cooperative:
            lost, self._eager_revoked = self._eager_revoked - added, set()
            if lost:
                self.forget(lost)
                self.on_revoke(lost)
            # Eager: everything was revoked first; a partition that came back resumes after
            # the last record read (those before were committed on revocation or are in the
            # batch being filled, which keeps them).
            for tp in partitions:
                if tp.partition in self._next_offset:
                    tp.offset = self._next_offset[tp.partition]
        self._owned |= added
        self._assigning = added  # a seek of these (a restore) sets their start offset
        try:
            self.on_assign(set(self._owned))
        finally:
            self._assigning = None
            self._start_offsets(partitions)
            if self._cooperative:
                consumer.incremental_assign(partitions)
            else:
                consumer.assign(partitions)

    def _revoked(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.generation += 1
        revoked = {tp.partition for tp in partitions}
        try:
            # e.g. checkpoint the state they own; exactly-once: every owned partition, since
            # the transaction this commits holds the outputs of the retained ones too
            self.on_revoking(set(self._owned) if self.transactional else revoked)
            self._commit_now()
        finally:
            self._release(consumer, partitions, revoked)

    def _lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Partitions taken away without a clean revocation (e.g. a missed session): their
        offsets are not ours to commit any more."""
        self.generation += 1
        for tp in partitions:
            self._uncommitted.pop(tp.partition, None)
        self._release(consumer, partitions, {tp.partition for tp in partitions})
        self._abort_after_loss()

    def _release(self, consumer: Consumer, partitions: list[TopicPartition],
                 revoked: set[int]) -> None:
        if self._cooperative:
            consumer.incremental_unassign(partitions)
        else:
            consumer.unassign()
        self._owned -= revoked
        if not self._cooperative:  # eager: what is lost is known at the next assignment
            self._eager_revoked |= revoked
            return
        self.forget(revoked)
        self.on_revoke(revoked)

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            self._fatal = err
        elif err.code() == KafkaError._ALL_BROKERS_DOWN:
            self._all_down = True
        else:
            log.debug("librdkafka: %s", err)

    def _check_brokers(self) -> None:
        """librdkafka reconnects by itself and says nothing when brokers are back: while it
        reports every broker down, each poll asks for the input topic's metadata (1 s bound)
        and raises KafkaUnavailable until a broker answers, so readiness tells the truth."""
        if not self._all_down:
            return
        try:
            self.consumer.list_topics(self.topic, timeout=_IDLE_COMMIT_S)
        except KafkaException as exc:
            raise KafkaUnavailable(f"all brokers are down: {exc}") from exc
        self._all_down = False

    def _on_commit(self, err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        """A commit's result (inside poll when asynchronous). Pending offsets stay pending until
        a commit covering them succeeded: a commit rejected while a cooperative rebalance is in
        progress is retried by the next one, and the synchronous commit on revocation still
        covers everything acknowledged."""
        self._last_commit_error = None if err is None else err.code()
        if err is not None and err.code() != KafkaError._NO_OFFSET:
            reason = "rebalance" if err.code() in MEMBERSHIP_CODES else "timeout"
            self.on_commit_failed(reason)
            if err.code() in GENERATION_GONE:
                log.warning("offset commit rejected (%s): this member's generation is gone, so "
                            "are its partitions; offsets not committed by then will be "
                            "re-delivered to their next owner", err.name())
            else:
                log.warning("offset commit failed (%s); retried with the next commit",
                            err.name())
            return
        for tp in partitions:
            if tp.error is None and self._uncommitted.get(tp.partition, -1) <= tp.offset:
                self._uncommitted.pop(tp.partition, None)
        if err is None and self.on_committed is not None:
            self.on_committed()

    # --- consuming -------------------------------------------------------------------------

    def poll(self) -> list[Message]:
        """Records of owned partitions: waits up to 0.1 s for a first one, then takes what is
        already queued, up to ``max_batch_events``. A rebalance during the call drops records
        of partitions revoked meanwhile (counted through ``on_dropped``)."""
        limit = self.settings.max_batch_events
        generation = self.generation
        self._sought = {}
        self._check_brokers()
        first = self.consumer.poll(_IDLE_POLL_S)
        if first is None:
            self._check_fatal()
            if self._uncommitted and time.monotonic() - self._commit_issued >= _IDLE_COMMIT_S:
                self.commit_pending()  # idle: retry what a failed commit left pending
            return []
        msgs = [first, *self.consumer.consume(limit - 1, timeout=0)] if limit > 1 else [first]
        # (identity, not ==: a KafkaError compared with None raises TypeError)
        clean = not any(map(is_not, map(type(first).error, msgs), repeat(None)))
        batch = _messages(msgs) if clean else self._messages_and_errors(msgs)
        nxt = self._next_offset
        for m in batch:
            expected = nxt.get(m.partition)
            if expected is not None and m.offset > expected:
                self._check_gap(m.partition, m.offset)
            nxt[m.partition] = m.offset + 1
        if self.generation != generation:
            kept = [m for m in batch if m.partition in self._owned]
            if len(kept) != len(batch):
                self.on_dropped(len(batch) - len(kept))
                log.warning("rebalance during a batch: dropped %d records of partitions no "
                            "longer assigned", len(batch) - len(kept))
            batch = self._drop_sought(kept)
        return batch

    def _messages_and_errors(self, msgs: list[Any]) -> list[Message]:
        """:func:`_messages` of a batch holding errors: end-of-partition events are skipped,
        any other error raises."""
        for m in msgs:
            err = m.error()
            if err is not None and err.code() != KafkaError._PARTITION_EOF:
                _raise("poll failed", err)
        return _messages([m for m in msgs if m.error() is None])

    def _log_start(self, partition: int) -> int | None:
        low, _ = self.consumer.get_watermark_offsets(TopicPartition(self.topic, partition),
                                                     timeout=1.0)
        return low

    def _check_fatal(self) -> None:
        if self._fatal is not None:
            raise KafkaEdgeError(f"fatal Kafka error: {self._fatal.name()}: {self._fatal.str()}")

    def _seek_input(self, partition: int, offset: int) -> None:
        try:
            self.consumer.seek(TopicPartition(self.topic, partition, offset))
        except KafkaException as exc:
            log.warning("cannot seek %s[%d] to %d: %s", self.topic, partition, offset, exc)

    # --- producing and committing ----------------------------------------------------------

    def _delivered(self, err: KafkaError | None, msg: Any) -> None:
        """Delivery report; called only for failures (``delivery.report.only.error``). A record
        refused for what it is is matched back to its origin (a scan, only on this rare path)."""
        if err is None:
            return
        if self.on_refused is None or err.code() not in REFUSED_CODES:
            self._failures.append(err)
            return
        record = (msg.topic(), msg.key(), msg.value(), msg.headers())
        for i, (topic, key, value, origin, final) in enumerate(self._pending):
            if (topic, key, value) == record[:3]:
                del self._pending[i]
                self._refused.append((record, origin, err, final))
                return
        self._failures.append(err)

    def send(self, topic: str, key: bytes | None, value: bytes | None,
             headers: Headers | None = None, origin: object = None) -> None:
        """Buffer one record; ``origin`` (e.g. the input message) is handed to ``on_refused``
        if the producer or the broker refuses this record for what it is (size, format)."""
        self._produce(topic, key, value, headers, origin, final=False)

    def _produce(self, topic: str, key: bytes | None, value: bytes | None,
                 headers: Headers | None, origin: object, final: bool) -> None:
        try:
            self.producer.produce(topic, value, key, headers=headers)  # type: ignore[arg-type]
        except BufferError:  # the local queue is full: serve acks until there is room
            self._produce_when_room(topic, value, key, headers=headers)
        except KafkaException as exc:
            err = exc.args[0]
            if self.on_refused is None or err.code() not in REFUSED_CODES:
                _raise(f"produce to {topic} failed", err)
            self._refuse((topic, key, value, headers), origin, err, final)
            return
        if self.on_refused is not None:
            self._pending.append((topic, key, value, origin, final))
        self._sent += 1

    def _refuse(self, record: Record, origin: object, err: KafkaError, final: bool) -> None:
        """Hand a refused record to ``on_refused`` and send its replacement (once)."""
        assert self.on_refused is not None
        replacement = self.on_refused(record, origin, KafkaException(err), final)
        if replacement is not None and not final:
            topic, key, value, headers = replacement
            self._produce(topic, key, value, headers, origin, final=True)

    def flush_and_commit(self, batch: Sequence[Message]) -> bool:
        """Wait for the acks of everything sent for ``batch``, then commit its offsets
        (asynchronously). Returns whether a commit was issued; always False when
        ``on_committed`` is given, which then hears of each success as it arrives (also while
        idle). Raises KafkaUnavailable, after seeking back, when acks do not come within
        ``flush_timeout_s`` or a record failed."""
        try:
            self.flush()
        except KafkaEdgeError:
            self.rewind(batch)
            raise
        for msg in batch:
            if msg.partition in self._owned:
                self._uncommitted[msg.partition] = max(
                    self._uncommitted.get(msg.partition, 0), msg.offset + 1)
        return self.commit_pending() and self.on_committed is None

    def _flush_acks(self) -> None:
        sent, self._sent = self._sent, 0
        if not sent and not self._failures:
            return
        # producer.flush() returns how many records are still unacknowledged (0: none)
        left = self._wait_acks(lambda timeout_s: self.producer.flush(timeout_s) or None)
        if left is not None:
            raise KafkaUnavailable(f"{left} of {sent} records not acknowledged in time; "
                                   "offsets not committed, the batch will be re-delivered")
        self._pending.clear()  # every delivery report of those records has been served
        if self._refused:  # replacements (e.g. dead letters that fit) go out, then wait again
            refused, self._refused = self._refused, []
            for record, origin, err, final in refused:
                self._refuse(record, origin, err, final)
            self._sent += 1  # let the recursive flush wait even if every replacement was dropped
            return self._flush_acks()
        failures, self._failures = self._failures, []
        if failures:
            err = failures[0]
            cls = KafkaUnavailable if is_transient(err) else KafkaEdgeError
            raise cls(f"{len(failures)} of {sent} records were not acknowledged: {err.name()}: "
                      f"{err.str()}; offsets not committed, the batch will be re-delivered")

    def commit_pending(self, asynchronous: bool = True) -> bool:
        """Commit acknowledged offsets; returns whether a commit was issued (asynchronous, the
        default: the result comes through ``on_commit``) or succeeded (synchronous). Never
        raises for a transient fault."""
        if not self._uncommitted:
            return False
        offsets = [TopicPartition(self.topic, p, o) for p, o in self._uncommitted.items()]
        self._commit_issued = time.monotonic()
        try:
            if asynchronous:
                self.consumer.commit(offsets=offsets, asynchronous=True)
                return True
            result = self.consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            err = exc.args[0]
            if not is_transient(err):
                raise KafkaEdgeError(f"commit failed: {err.name()}: {err.str()}") from exc
            self._on_commit(err, offsets)
            return False
        failed = [tp for tp in result or [] if tp.error is not None]
        self._on_commit(failed[0].error if failed else None, result or offsets)
        return not failed

    def _commit_now(self) -> tuple[bool, bool]:
        """Flush and commit synchronously (revocation, close): nothing acknowledged is lost.
        Returns whether everything sent was acknowledged, and whether every acknowledged
        offset is committed (the offsets of earlier batches are committed either way)."""
        try:
            self.flush()
            acked = True
        except KafkaEdgeError as exc:
            log.error("flush before a synchronous commit failed: %s", exc)
            acked = False
        return acked, not self._uncommitted or self.commit_pending(asynchronous=False)

    # --- state -----------------------------------------------------------------------------

    def assigned_partitions(self) -> set[int]:
        return set(self._owned)

    def lag(self) -> dict[tuple[str, int], float] | None:
        """Per owned partition: the high watermark of the last fetch minus the position. Both
        are librdkafka's local state: measuring lag sends no request."""
        lags: dict[tuple[str, int], float] = {}
        tps = [TopicPartition(self.topic, p) for p in sorted(self._owned)]
        if not tps:
            return lags
        try:
            positions = self.consumer.position(tps)
            for tp in positions:
                _, high = self.consumer.get_watermark_offsets(tp, cached=True)
                if high >= 0 and tp.offset >= 0:
                    lags[(tp.topic, tp.partition)] = float(max(high - tp.offset, 0))
        except KafkaException as exc:
            log.debug("cannot read lag: %s", exc)
            return None
        return lags

    def close(self) -> bool:
        """Flush, commit synchronously and leave the group, within ``drain_timeout_s``.
        Returns whether everything sent was acknowledged and committed. Safe to call twice."""
        if getattr(self, "_closed", False):
            return True
        self._closed = True
        self.stop.set()
        deadline = self._deadline(self.settings.drain_timeout_s)
        acked, committed = self._commit_now()
        # A commit rejected while a rebalance is in progress or timed out (coordinator away) is
        # tried again until the drain deadline, as the kafka-python edge does; one whose
        # generation is gone (the partitions moved on) cannot succeed: its offsets are re-read.
        while (not committed and self._uncommitted and time.monotonic() < deadline
               and self._last_commit_error not in GENERATION_GONE):
            time.sleep(min(0.2, max(deadline - time.monotonic(), 0.0)))
            committed = self.commit_pending(asynchronous=False)
        left = self.producer.flush(max(deadline - time.monotonic(), 0.0))
        clean = acked and committed and left == 0
        try:
            self.consumer.close()
        except (KafkaException, RuntimeError) as exc:
            log.warning("leaving the group: %s", exc)
        self._close_changelog()
        return clean

"""The Kafka edge as one small interface, with a kafka-python and a confluent-kafka implementation.

The service only ever talks to :class:`Edge`; ``kafka_client`` (``--kafka-client``) picks the
implementation: ``kafka-python`` (:mod:`streamer.kafka_edge`, the default) or ``confluent``
(:mod:`streamer.confluent_edge`, librdkafka). Both keep the same contract: at-least-once
(offsets committed only after every output of the batch was acknowledged), batches that never
mix records from before and after a rebalance, transient faults raised as ``KafkaUnavailable``
and bounded waits.

Usage::

    edge = make_edge(settings, on_assign, on_revoke, on_gap)
    batch = edge.poll()
    edge.send(topic, key, value)
    edge.flush_and_commit(batch)
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Protocol, TypeVar

from streamer.events import Message
from streamer.settings import StreamerSettings

PartitionCallback = Callable[[set[int]], None]
Headers = list[tuple[str, bytes]]
Record = tuple[str, bytes | None, bytes | None, Headers | None]  # topic, key, value, headers
# (record, origin given to send(), error, final) -> a replacement to send, or None
RefusedCallback = Callable[[Record, object, Exception, bool], Record | None]
ChangelogRecord = tuple[int, bytes | None, bytes | None, Headers | None]  # partition, key, ...
T = TypeVar("T")


class Edge(Protocol):
    """What the service needs from Kafka: poll a batch, send, flush and commit, ownership."""

    def poll(self) -> list[Message]:
        """Up to ``max_batch_events`` records of partitions this member owns (maybe none)."""
        ...

    def send(self, topic: str, key: bytes | None, value: bytes | None,
             headers: Headers | None = None, origin: object = None) -> None:
        """Buffer one output record; ``origin`` (the input message) goes to ``on_refused``
        if the record is refused for what it is (size, format)."""
        ...

    def flush_and_commit(self, batch: Sequence[Message]) -> Any:
        """Wait until every record sent for ``batch`` is acknowledged, then commit it."""
        ...

    def assigned_partitions(self) -> set[int]:
        ...

    def lag(self) -> Any:
        """Per (topic, partition): messages between the position and the log end; None when
        it cannot be read now."""
        ...

    def rewind(self, batch: Sequence[Message]) -> None:
        """Seek back to the first record of each owned partition of ``batch``."""
        ...

    def close(self) -> bool:
        """Flush, commit, leave the group within ``drain_timeout_s``; whether all was clean."""
        ...


STALL_S = 2.0  # a flush waiting longer than this makes the service not ready until it ends
_WAIT_SLICE_S = 0.5  # longest wait between liveness heartbeats while blocked on Kafka


def transactional_id(settings: StreamerSettings) -> str | None:
    """The producer's transactional id under exactly-once (None otherwise): the
    ``transactional_id`` setting, else the static member id ``group_instance_id``, else the
    group id with a random suffix. It should be stable per replica: initialising it fences a
    predecessor with the same id and aborts its open transaction (KIP-98)."""
    if settings.processing_guarantee != "exactly_once":
        return None
    return (settings.transactional_id or settings.group_instance_id
            or f"{settings.group_id}-{uuid.uuid4().hex}")


class EdgeBase:
    """What both implementations share: the service's callbacks (each optional, a no-op when
    not given), the deadlines of blocking waits (cut to ``drain_timeout_s`` once ``stop`` is
    set), the flush wait, and the input positions (``rewind``, ``forget``, the offset-gap
    check). Each client supplies its calls: ``_seek_input``, ``_committed_offset``,
    ``_log_start`` and ``CLIENT_ERRORS`` (what its calls raise)."""

    CLIENT_ERRORS: ClassVar[tuple[type[Exception], ...]] = ()

    def __init__(
        self,
        settings: StreamerSettings,
        on_assign: PartitionCallback,
        on_revoke: PartitionCallback,
        on_gap: Callable[[int, int], None] | None = None,
        on_dropped: Callable[[int], None] | None = None,
        on_commit_failed: Callable[[str], None] | None = None,
        on_committed: Callable[[], None] | None = None,
        stop: threading.Event | None = None,
        beat: Callable[[], None] | None = None,
        on_stall: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.topic = settings.input_topic
        self.on_assign = on_assign
        self.on_revoke = on_revoke
        self.on_gap = on_gap or (lambda partition, n: None)
        self.on_dropped = on_dropped or (lambda n: None)
        self.on_commit_failed = on_commit_failed or (lambda reason: None)
        self.on_committed = on_committed  # a commit succeeded (asynchronous: inside poll)
        self.stop = stop or threading.Event()
        self.beat = beat or (lambda: None)
        self.on_stall = on_stall or (lambda reason: None)
        self._drain_deadline: float | None = None
        self._log = logging.getLogger(type(self).__module__)  # the client module's logger
        self._next_offset: dict[int, int] = {}  # partition -> next offset we expect to read
        self._uncommitted: dict[int, int] = {}  # partition -> offset to commit (acked)

    def _deadline(self, timeout_s: float) -> float:
        """``now + timeout_s``, cut to the drain deadline once stopping."""
        return self._cap(time.monotonic() + timeout_s)

    def _cap(self, deadline: float) -> float:
        if self.stop.is_set():
            if self._drain_deadline is None:
                self._drain_deadline = time.monotonic() + self.settings.drain_timeout_s
            deadline = min(deadline, self._drain_deadline)
        return deadline

    def _wait_acks(self, flush: Callable[[float], T | None]) -> T | None:
        """Wait up to ``flush_timeout_s`` (cut to the drain deadline, also when ``stop`` is
        set meanwhile) for ``flush(slice_s)`` to return None (everything acknowledged), in
        slices of at most 0.5 s: ``beat()`` after each slice, ``on_stall`` once the wait
        passes ``STALL_S``. Returns None when acknowledged, else what the last slice returned
        (the client's reason: records left, a timeout error) once the deadline passed."""
        deadline = self._deadline(self.settings.flush_timeout_s)
        started = time.monotonic()
        while True:
            deadline = self._cap(deadline)  # a SIGTERM meanwhile shortens the wait
            pending = flush(max(min(deadline - time.monotonic(), _WAIT_SLICE_S), 0.0))
            if pending is None:
                return None
            self.beat()
            waited = time.monotonic() - started
            if waited > STALL_S:
                self.on_stall(f"outputs unacknowledged for {waited:.0f} s")
            if time.monotonic() >= deadline:
                return pending

    # --- input positions -----------------------------------------------------------------

    def assigned_partitions(self) -> set[int]:
        raise NotImplementedError

    def _seek_input(self, partition: int, offset: int) -> None:
        """Seek input ``partition`` to ``offset`` with the client."""
        raise NotImplementedError

    def _committed_offset(self, partition: int) -> int | None:
        """The group's committed offset of ``partition``, when the client reads it for the
        gap check of a partition's first records (None: not read)."""
        return None

    def _log_start(self, partition: int) -> int | None:
        """The log start offset (low watermark) of input ``partition``; raises one of
        ``CLIENT_ERRORS`` when it cannot be read."""
        raise NotImplementedError

    def rewind(self, batch: Sequence[Message]) -> None:
        """Seek each owned partition of ``batch`` back to its first record, so an
        unacknowledged batch is read again (at-least-once) instead of being skipped."""
        first: dict[int, int] = {}
        for m in batch:
            first[m.partition] = min(first.get(m.partition, m.offset), m.offset)
        owned = self.assigned_partitions()
        for partition, offset in first.items():
            if partition in owned:
                self._seek_input(partition, offset)
                self._next_offset[partition] = offset

    def forget(self, partitions: set[int]) -> None:
        """Drop positions of partitions that moved to another member: when one comes back,
        the offsets in between were someone else's to process, not a gap."""
        for p in partitions:
            self._next_offset.pop(p, None)
            self._uncommitted.pop(p, None)

    def _check_gap(self, partition: int, first_offset: int) -> None:
        """Count and log loudly the offsets before ``first_offset`` (the first record read
        of ``partition`` since the last) that were lost: deleted by retention before they
        were read (the log start moved past the expected offset). Transaction markers,
        aborted records (read_committed) and compaction leave gaps that lost nothing."""
        expected = self._next_offset.get(partition)
        if expected is None:
            # First records since the assignment: compare with the group's committed offset,
            # which catches a reset after the broker deleted what we had not read yet.
            expected = self._committed_offset(partition)
        if expected is None or first_offset <= expected:
            return
        try:
            low = self._log_start(partition)
        except self.CLIENT_ERRORS as exc:
            self._log.warning("offsets %d..%d of %s[%d] were not returned and the log start cannot "
                              "be read (%s); not counted as lost", expected,
                              first_offset - 1, self.topic, partition, exc)
            return
        if low is None or low <= expected:
            self._log.debug("%s[%d]: offsets %d..%d were control records, aborted or "
                            "compacted", self.topic, partition, expected, first_offset - 1)
            return
        skipped = min(low, first_offset) - expected
        self._log.warning(
            "SKIPPED %d offsets on %s[%d] (%d..%d): the broker deleted them (retention) before "
            "they were read; those events were NOT processed",
            skipped, self.topic, partition, expected, expected + skipped - 1,
        )
        self.on_gap(partition, skipped)


def make_edge(settings: StreamerSettings, on_assign: PartitionCallback,
              on_revoke: PartitionCallback, on_gap: Callable[[int, int], None] | None = None,
              **kwargs: Any) -> Edge:
    """The edge ``settings.kafka_client`` names, wired to the service's callbacks."""
    if settings.kafka_client == "confluent":
        from streamer.confluent_edge import ConfluentEdge

        return ConfluentEdge(settings, on_assign, on_revoke, on_gap, **kwargs)
    from streamer.kafka_edge import KafkaEdge

    return KafkaEdge(settings, on_assign, on_revoke, on_gap, **kwargs)

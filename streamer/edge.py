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

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from streamer.events import Message
from streamer.settings import StreamerSettings

PartitionCallback = Callable[[set[int]], None]


class Edge(Protocol):
    """What the service needs from Kafka: poll a batch, send, flush and commit, ownership."""

    def poll(self) -> list[Message]:
        """Up to ``max_batch_events`` records of partitions this member owns (maybe none)."""
        ...

    def send(self, topic: str, key: bytes | None, value: bytes | None,
             headers: list[tuple[str, bytes]] | None = None, origin: object = None) -> None:
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


class EdgeBase:
    """What both implementations share: the service's callbacks (each optional, a no-op when
    not given) and the deadlines of blocking waits, cut to ``drain_timeout_s`` once ``stop``
    is set."""

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

    def _deadline(self, timeout_s: float) -> float:
        """``now + timeout_s``, cut to the drain deadline once stopping."""
        return self._cap(time.monotonic() + timeout_s)

    def _cap(self, deadline: float) -> float:
        if self.stop.is_set():
            if self._drain_deadline is None:
                self._drain_deadline = time.monotonic() + self.settings.drain_timeout_s
            deadline = min(deadline, self._drain_deadline)
        return deadline


def make_edge(settings: StreamerSettings, on_assign: PartitionCallback,
              on_revoke: PartitionCallback, on_gap: Callable[[int, int], None] | None = None,
              **kwargs: Any) -> Edge:
    """The edge ``settings.kafka_client`` names, wired to the service's callbacks."""
    if settings.kafka_client == "confluent":
        from streamer.confluent_edge import ConfluentEdge

        return ConfluentEdge(settings, on_assign, on_revoke, on_gap, **kwargs)
    from streamer.kafka_edge import KafkaEdge

    return KafkaEdge(settings, on_assign, on_revoke, on_gap, **kwargs)

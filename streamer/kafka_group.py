"""Consumer-group plumbing for the Kafka edge: the partition assignors, the rebalance listener,
and which Kafka errors are transient (retry with backoff) and which need a person (stop).

Kept apart from :mod:`streamer.kafka_edge` so that the batch/commit logic there stays short;
a second client (confluent-kafka) would bring its own version of this module.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from kafka import TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.coordinator.assignors.range import RangePartitionAssignor
from kafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
from kafka.coordinator.assignors.sticky.sticky_assignor import StickyPartitionAssignor
from kafka.errors import (
    AuthorizationError,
    CommitFailedError,
    FencedInstanceIdError,
    IllegalArgumentError,
    IllegalGenerationError,
    IncompatibleBrokerVersion,
    InvalidConfigurationError,
    InvalidGroupIdError,
    InvalidSessionTimeoutError,
    InvalidTopicError,
    KafkaConfigurationError,
    KafkaError,
    MessageSizeTooLargeError,
    RebalanceInProgressError,
    RecordListTooLargeError,
    SaslAuthenticationFailedError,
    UnknownMemberIdError,
    UnsupportedCodecError,
    UnsupportedSaslMechanismError,
    UnsupportedVersionError,
)

from streamer.errors import KafkaEdgeError, KafkaUnavailable

if TYPE_CHECKING:
    from streamer.kafka_edge import KafkaEdge

ASSIGNORS: dict[str, Any] = {
    "sticky": StickyPartitionAssignor,
    "range": RangePartitionAssignor,
    "roundrobin": RoundRobinPartitionAssignor,
}
# Errors that say "the group moved on": the pending offsets are no longer ours to commit.
MEMBERSHIP_ERRORS = (
    CommitFailedError, RebalanceInProgressError, IllegalGenerationError, UnknownMemberIdError,
)
# Of those, the ones after which this member's generation is gone: its commits can never succeed
# and its partitions may have moved, so the offsets are dropped (their next owner re-reads them).
# A rebalance merely in progress keeps them pending: the member may keep its partitions.
GENERATION_GONE_ERRORS = (CommitFailedError, IllegalGenerationError, UnknownMemberIdError)


def generation_gone(error: BaseException) -> bool:
    """Whether a failed commit means this member's generation is gone (its offsets are dropped)
    rather than a rebalance merely in progress (they stay pending). kafka-python 2.x reports an
    OffsetCommit answered REBALANCE_IN_PROGRESS as a CommitFailedError wrapping a
    RebalanceInProgressError (and asks to rejoin): that is the second kind."""
    if isinstance(error, CommitFailedError) and any(
            isinstance(a, RebalanceInProgressError) for a in error.args):
        return False
    return isinstance(error, GENERATION_GONE_ERRORS)

# Errors retrying cannot fix: the settings, the credentials or the data must change first.
FATAL_ERRORS: tuple[type[KafkaError], ...] = (
    AuthorizationError, SaslAuthenticationFailedError, UnsupportedSaslMechanismError,
    KafkaConfigurationError, InvalidConfigurationError, IllegalArgumentError,
    IncompatibleBrokerVersion, UnsupportedVersionError, UnsupportedCodecError,
    InvalidGroupIdError, InvalidSessionTimeoutError, InvalidTopicError, FencedInstanceIdError,
    MessageSizeTooLargeError, RecordListTooLargeError,
)


def is_transient(exc: BaseException) -> bool:
    """Whether retrying later can succeed. Every Kafka error counts as transient (outages,
    timeouts, coordinator moves, rebalances, a group protocol round the coordinator refused)
    except those in FATAL_ERRORS, which name a setting, a credential or a record to fix."""
    return isinstance(exc, KafkaError) and not isinstance(exc, FATAL_ERRORS)


# kafka-python backs reconnects off up to 30 s; a broker back after an outage would then wait
# that long for us. 1 s keeps recovery quick at one connection attempt per second per broker.
RECONNECT_BACKOFF_MAX_MS = 1000


def wrap(what: str, exc: KafkaError) -> KafkaEdgeError:
    cls = KafkaUnavailable if is_transient(exc) else KafkaEdgeError
    return cls(f"{what}: {type(exc).__name__}: {exc}")


class RebalanceListener(ConsumerRebalanceListener):
    """Runs inside ``consumer.poll()``: possibly in the middle of filling a batch, which is why
    every call bumps the edge's generation (see :meth:`KafkaEdge.poll`).

    Eager rebalancing revokes everything and then assigns the new set, so keys are released
    only for partitions that did not come back: state that stays with this process survives.
    """

    def __init__(self, edge: KafkaEdge) -> None:
        self.edge = edge
        self.revoked: set[int] = set()

    def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        self.edge.generation += 1
        self.edge.rebalancing = True
        self.revoked = {tp.partition for tp in revoked}
        try:
            self.edge.on_revoking(self.revoked)  # e.g. checkpoint the state they own
        finally:
            self.edge.commit_pending()

    def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        self.edge.generation += 1
        self.edge.rebalancing = False
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

"""The error tree. Foreign errors are wrapped at the boundary with ``raise ... from exc``.

    StreamerError
    ├── ConfigError        a setting is invalid; the message names the field (fails at start)
    ├── BadEvent           one input message is unusable; carries a DLQ ``reason`` code.
    │                      Data for the dead-letter path, never a reason to stop the loop.
    ├── ArtifactError      a model artifact is unreadable, corrupt or inconsistent; the
    │                      serving model is kept
    ├── RegistryError      the model registry is missing, malformed or refuses an operation
    └── KafkaEdgeError     the broker refused or lost something we cannot retry
        └── KafkaUnavailable  a broker, the coordinator or the group is unavailable for
                              now (outage, timeout, rebalance): retried with backoff
"""

from __future__ import annotations


class StreamerError(Exception):
    """Root of every error this project raises on purpose."""


class ConfigError(StreamerError):
    """A setting is invalid. ``field`` names it so the operator knows what to fix."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"invalid setting {field!r}: {message}")
        self.field = field


class BadEvent(StreamerError):
    """An input message cannot be used. ``reason`` is a short, stable code for metrics/DLQ."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class ArtifactError(StreamerError):
    """A model artifact was refused (checksum, dims, non-finite weights, unreadable)."""


class IncompleteArtifact(ArtifactError):
    """A file of the artifact is missing or does not match its checksum yet: it may still be
    arriving (a file-by-file sync), so the model watcher retries it with backoff."""


class RegistryError(StreamerError):
    """The model registry cannot serve the request."""


class KafkaEdgeError(StreamerError):
    """A Kafka operation failed in a way the service cannot recover from by itself."""


class KafkaUnavailable(KafkaEdgeError):
    """A transient Kafka fault: the caller backs off and retries; nothing is lost because
    offsets of unacknowledged work are not committed (the records are re-delivered)."""

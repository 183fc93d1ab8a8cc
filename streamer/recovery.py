"""Checkpoint and restore of per-key state through a changelog topic, for any Kafka client.

The changelog is co-partitioned with the input: changelog partition N holds the state records
of input partition N's keys (keyed by the event key, so it can be compacted), followed by a
checkpoint marker carrying the input offset the records cover. A checkpoint of a partition is
its changed keys, tombstones for its evicted keys, then the marker; once all of that is
acknowledged the input offset is committed to the marker's offset (they move together).

Restore reads a changelog partition from its start to its high watermark: records go into a
pending set that a marker makes final, so records after the last marker (a checkpoint cut short
by a crash) are ignored. The input is then sought to the marker's offset and the events after it
are replayed through the model, which makes the state, and every prediction, equal to an
uninterrupted run's. (quix-streams ``state/recovery.py`` ``RecoveryManager`` and Kafka Streams'
changelog restore work the same way.)

The Kafka work goes through four edge methods any client implements (see :class:`StateEdge`).

Usage::

    recovery = StateRecovery(engine, "grp-state", interval_s=5.0, interval_events=None,
                             swap_policy="rewarm")
    stats = recovery.restore(edge, {0, 1}, version)     # on every assignment
    recovery.processed(batch)                             # after each batch's outputs
    if recovery.due():
        recovery.checkpoint(edge, assigned, version)      # records + markers, then commit
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from streamer.checkpoint import (
    MARKER_HEADER,
    MARKER_KEY,
    CorruptStateRecord,
    Dims,
    decode_marker,
    decode_state,
    encode_marker,
    encode_states,
    split_payloads,
    write_states,
)
from streamer.edge import ChangelogRecord, Headers
from streamer.engine import Engine
from streamer.events import Message
from streamer.state import StateStore

log = logging.getLogger(__name__)


class StateEdge(Protocol):
    """What checkpoint and restore need from a Kafka client (kafka-python and confluent)."""

    def send_changelog(self, partition: int, key: bytes, value: bytes | None,
                       headers: Headers | None = None) -> None:
        """Buffer one changelog record for ``partition`` (None value: a tombstone)."""

    def flush(self) -> None:
        """Wait until everything sent is acknowledged (raises on failure)."""

    def commit_offsets(self, offsets: dict[int, int]) -> bool:
        """Commit these next-to-process input offsets; whether the commit went through."""

    def read_changelog(self, partitions: set[int]) -> Iterator[ChangelogRecord]:
        """Every record of these changelog partitions from the start to the high watermark
        read at the call, in offset order per partition: (partition, key, value, headers)."""

    def topic_partitions(self, topic: str) -> int:
        """How many partitions ``topic`` has (0: it does not exist)."""
        ...

    def seek(self, partition: int, offset: int) -> None:
        """Consume input ``partition`` from ``offset`` next (called inside an assignment)."""


@dataclass
class RestoreStats:
    partitions: int = 0
    records: int = 0
    keys: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> records
    rewarmed: int = 0
    seconds: float = 0.0

    @property
    def records_per_s(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else 0.0


@dataclass
class CheckpointStats:
    partitions: int = 0
    records: int = 0
    bytes: int = 0
    seconds: float = 0.0
    committed: bool = False


class StateRecovery:
    """Which keys changed since the last checkpoint, when to checkpoint, and how to restore."""

    def __init__(
        self, engine: Engine, topic: str, interval_s: float | None,
        interval_events: int | None, swap_policy: str = "rewarm",
    ) -> None:
        self.engine = engine
        self.topic = topic
        self.interval_s = interval_s
        self.interval_events = interval_events
        self.swap_policy = swap_policy
        engine.store.evictions = []
        self.position: dict[int, int] = {}  # partition -> next input offset processed
        self.marker: dict[int, int] = {}  # partition -> offset of our last complete marker
        self._events = 0
        self._last = time.monotonic()

    @property
    def store(self) -> StateStore:
        return self.engine.store

    # --- checkpoint ------------------------------------------------------------------------

    def processed(self, batch: Sequence[Message]) -> None:
        """Note the offsets a processed batch covers (its outputs are acknowledged)."""
        for m in batch:
            if m.offset + 1 > self.position.get(m.partition, -1):
                self.position[m.partition] = m.offset + 1
        self._events += len(batch)

    def due(self) -> bool:
        if self.interval_events is not None and self._events >= self.interval_events:
            return True
        return self.interval_s is not None and time.monotonic() - self._last >= self.interval_s

    def clean(self, partition: int) -> bool:
        """True when the resident state of ``partition`` is exactly its last checkpoint's."""
        pos = self.position.get(partition)
        return pos is not None and self.marker.get(partition) == pos and not (
            self.store.keys_of(partition, dirty_only=True))

    def checkpoint(self, edge: StateEdge, partitions: Iterable[int],
                   version: str) -> CheckpointStats:
        """Write changed keys, tombstones and a marker for each of ``partitions`` whose
        position moved, wait for the acks, then commit the markers' offsets. Raises what
        ``edge.flush`` raises (then nothing is marked clean and nothing is committed)."""
        t0 = time.perf_counter()
        stats = CheckpointStats()
        store = self.store
        wanted = set(partitions)
        evictions = store.evictions or []
        gone: dict[int, list[str]] = {}
        for key, p in evictions:
            gone.setdefault(p, []).append(key)
        offsets: dict[int, int] = {}
        written: list[str] = []
        for p in sorted(wanted):
            pos = self.position.get(p)
            keys = store.keys_of(p, dirty_only=True) if pos is not None else []
            if pos is None or (pos == self.marker.get(p) and p not in gone and not keys):
                continue
            for key in gone.get(p, []):
                if key not in store or store.partition_of(key) != p:
                    edge.send_changelog(p, key.encode(), None)
                    stats.records += 1
            values = encode_states(store, keys, version, store.last_seen(keys))
            for key, value in zip(keys, values, strict=True):
                edge.send_changelog(p, key.encode(), value)
                stats.bytes += len(value)
            marker = encode_marker(pos, time.time())
            edge.send_changelog(p, MARKER_KEY, marker, [MARKER_HEADER])
            stats.records += len(keys) + 1
            stats.bytes += len(marker)
            written.extend(keys)
            offsets[p] = pos
        if offsets:
            edge.flush()
            # At-least-once: the acked marker makes the checkpoint; exactly-once: the commit
            # of its transaction does (commit_offsets raises when it was aborted).
            stats.committed = edge.commit_offsets(offsets)
            for key in written:
                store.dirty[store.slot(key)] = False
            self.marker.update(offsets)
            stats.partitions = len(offsets)
        store.evictions = [(k, p) for k, p in evictions if p not in wanted]
        self._events = 0
        self._last = time.monotonic()
        stats.seconds = time.perf_counter() - t0
        return stats

    def mark_all_dirty(self) -> None:
        """Every resident key changed (e.g. a model swap re-warmed them)."""
        store = self.store
        store.dirty[store.live_slots()] = True

    def forget(self, partitions: Iterable[int]) -> None:
        for p in partitions:
            self.position.pop(p, None)
            self.marker.pop(p, None)

    # --- restore ---------------------------------------------------------------------------

    def restore(self, edge: StateEdge, partitions: set[int], version: str) -> RestoreStats:
        """Rebuild ``partitions``' keys from the changelog up to each one's last marker, and
        seek the input to the marker (a partition with no marker starts cold from the
        committed offset). A record of another model version is re-warmed or reset per the
        swap policy; a corrupt record is skipped, counted and logged with its key."""
        t0 = time.perf_counter()
        stats = RestoreStats(partitions=len(partitions))
        store = self.store
        store.release_partitions(partitions)
        store.evictions = [(k, p) for k, p in store.evictions or [] if p not in partitions]
        self.forget(partitions)
        pending: dict[int, dict[bytes, bytes | None]] = {p: {} for p in partitions}
        final: dict[int, dict[bytes, bytes | None]] = {p: {} for p in partitions}
        markers: dict[int, int] = {}
        for p, key, value, headers in edge.read_changelog(partitions):
            stats.records += 1
            if key == MARKER_KEY and headers and MARKER_HEADER in headers:
                try:
                    markers[p] = decode_marker(value or b"")
                except CorruptStateRecord as exc:
                    self._skip(stats, "corrupt", p, "<marker>", exc)
                    continue
                final[p].update(pending[p])
                pending[p].clear()
            elif key is not None:
                pending[p][key] = value
        for p in sorted(partitions):
            records = {k: v for k, v in final[p].items() if v is not None}
            stats.keys += self._load(p, records, version, stats)
            if p in markers:
                edge.seek(p, markers[p])
                self.position[p] = self.marker[p] = markers[p]
        stats.seconds = time.perf_counter() - t0
        for p in sorted(partitions):
            log.info("restored partition %d: %d keys up to input offset %s", p,
                     len(store.keys_of(p)), markers.get(p, "(no checkpoint: cold start)"))
        log.info("restored %d partitions, %d keys from %d changelog records in %.2f s "
                 "(%.0f records/s)", stats.partitions, stats.keys, stats.records,
                 stats.seconds, stats.records_per_s)
        return stats

    def _skip(self, stats: RestoreStats, reason: str, p: int, key: str,
              exc: Exception) -> None:
        stats.skipped[reason] = stats.skipped.get(reason, 0) + 1
        log.error("skipped a %s changelog record of key %r (partition %d): %s; the key "
                  "starts cold", reason, key, p, exc)

    def _load(self, partition: int, records: dict[bytes, bytes], version: str,
              stats: RestoreStats) -> int:
        store = self.store
        dims = Dims.of(store)
        keys: list[str] = []
        versions: list[str] = []
        seen: list[float] = []
        payloads: list[memoryview] = []
        for raw_key, value in records.items():
            key = raw_key.decode("utf-8", "replace")
            try:
                v, last_seen, payload = decode_state(value, dims)
            except CorruptStateRecord as exc:
                self._skip(stats, "corrupt", partition, key, exc)
                continue
            keys.append(key)
            versions.append(v)
            seen.append(last_seen)
            payloads.append(payload)
        if not keys:
            return 0
        loaded = 0
        for lo in range(0, len(keys), store.capacity):
            hi = lo + store.capacity
            states = split_payloads(keys[lo:hi], versions[lo:hi], seen[lo:hi],
                                    payloads[lo:hi], dims)
            slots, _, _ = store.assign(states.keys, [partition] * len(states.keys),
                                       time.time())
            store.set_last_seen(slots, states.last_seen)
            store.dirty[slots] = False
            dev_slots = torch.from_numpy(slots).to(store.device)
            write_states(store, dev_slots, states)
            other = np.asarray([v != version for v in states.versions])
            if other.any():
                stats.rewarmed += self._refit(dev_slots[torch.from_numpy(other)])
            loaded += len(states.keys)
        return loaded

    @torch.inference_mode()
    def _refit(self, slots: torch.Tensor) -> int:
        """State written by another model version: per the swap policy, replay the key's
        window through the serving model from zeros (rewarm, and keep when shapes differ),
        start h and c from zeros (reset), or keep it (keep)."""
        store = self.store
        if self.swap_policy == "keep":
            return 0
        store.h[:, slots] = 0.0
        store.c[:, slots] = 0.0
        if self.swap_policy == "reset":
            return 0
        self.engine.rewarm(slots)  # the model swap's re-warm (Engine.rewarm)
        return int(slots.numel())

"""Partition ownership across rebalances: the service commits, then releases exactly the keys
of the partitions it lost (partitions it keeps keep their state); a rebalance in the middle of
a batch fill drops the revoked partitions' records and reads no kept offset twice.

Proved three ways: the listener driven directly, a consumer double that rebalances inside
``poll()`` as kafka-python does, and a real two-member group on the embedded broker."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from kafka import TopicPartition

from streamer.kafka_edge import KafkaEdge
from streamer.kafka_group import RebalanceListener
from streamer.service import Service

from ..kafka_helpers import Topics
from .fault_scenarios import _read_outputs, _Writer, scenario
from .service_helpers import running_service, settings_for


class _Edge:
    """Only what the listener calls; the callbacks are the real service's."""

    def __init__(self, service: Service) -> None:
        self.commits = 0
        self.generation = 0
        self.rebalancing = False
        self.forgotten: set[int] = set()
        self.on_revoke = service._on_revoke
        self.on_assign = service._on_assign
        self.on_revoking = service._on_revoking

    def forget(self, partitions: set[int]) -> None:
        self.forgotten |= partitions

    def commit_pending(self) -> bool:
        self.commits += 1
        return True


def test_rebalance_commits_and_releases_only_lost_partitions(
    topics: Topics, artifact_dir: Path
) -> None:
    service = Service.from_settings(settings_for(topics, artifact_dir))
    keys = [f"k{i}" for i in range(40)]
    partitions = [i % 4 for i in range(40)]
    service.engine.process(keys, partitions, np.ones((40, 4)), np.zeros(40), 0.0)
    before = {k: service.store.h[:, service.store.slot(k)].clone() for k in keys}
    edge = _Edge(service)
    listener = RebalanceListener(edge)  # type: ignore[arg-type]
    tps = [TopicPartition(topics.input, p) for p in range(4)]

    listener.on_partitions_assigned(tps)
    assert service._assigned == {0, 1, 2, 3} and service.health.ready()
    listener.on_partitions_revoked(tps)  # eager protocol: everything is revoked first
    assert edge.commits == 1, "processed offsets are committed before partitions move"
    listener.on_partitions_assigned(tps[:2])

    assert service._assigned == {0, 1}
    assert edge.forgotten == {2, 3}, "positions of moved partitions are not gaps later"
    assert len(service.store) == 20
    for key, part in zip(keys, partitions, strict=True):
        if part < 2:
            assert key in service.store and service.store.partition_of(key) == part
            assert bool((service.store.h[:, service.store.slot(key)] == before[key]).all())
        else:
            assert key not in service.store

    listener.on_partitions_revoked(tps[:2])
    listener.on_partitions_assigned([])
    assert len(service.store) == 0 and not service.health.ready()


# --- a consumer double that rebalances in the middle of a batch fill -----------------------


class _Future:
    is_done = True

    def failed(self) -> bool:
        return False


class _Producer:
    """Acknowledges every send at once and keeps what was sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, bytes | None]] = []

    def send(self, topic: str, key: bytes | None = None, value: bytes | None = None,
             headers: object = None, partition: int | None = None) -> _Future:
        self.sent.append((topic, key, value))
        return _Future()

    def partitions_for(self, topic: str) -> set[int]:
        return {0, 1, 2, 3}

    def flush(self, timeout: float | None = None) -> None:
        pass

    def close(self, timeout: float | None = None) -> None:
        pass


class _RebalancingConsumer:
    """Behaves as kafka-python's KafkaConsumer does around an eager rebalance: the listener
    runs inside ``poll()`` (revoke, then possibly in a later poll, assign) and every position
    of the new assignment is reset to the committed offset, so records already handed out
    come again. Each poll returns at most ``per_call`` records per partition."""

    def __init__(self, topic: str, logs: dict[int, list[tuple[bytes, bytes]]],
                 rebalance_at: int, new_assignment: set[int], split_join: bool,
                 per_call: int = 2) -> None:
        self.topic, self.logs, self.per_call = topic, logs, per_call
        self.rebalance_at, self.new_assignment, self.split_join = (
            rebalance_at, new_assignment, split_join)
        self.calls = 0
        self.assigned: set[int] = set()
        self.positions: dict[int, int] = {}
        self.committed_offsets: dict[int, int] = {}
        self.held_at_revoke: dict[int, int] = {}  # positions when the rebalance began
        self.listener: Any = None
        self.completed: list[Any] = []  # async commit callbacks, served by the next poll

    def subscribe(self, topics: list[str], listener: Any) -> None:
        self.listener = listener

    def _tps(self, parts: set[int]) -> list[TopicPartition]:
        return [TopicPartition(self.topic, p) for p in sorted(parts)]

    def _assign(self, parts: set[int]) -> None:
        self.assigned = set(parts)
        self.positions = {p: self.committed_offsets.get(p, 0) for p in parts}
        self.listener.on_partitions_assigned(self._tps(parts))

    def poll(self, timeout_ms: int = 0, max_records: int = 500) -> dict[Any, list[Any]]:
        self.calls += 1
        completed, self.completed = self.completed, []
        for callback in completed:  # kafka-python serves commit results inside poll()
            callback()
        if self.calls == 1:
            self._assign({0, 1, 2, 3})
        elif self.calls == self.rebalance_at:
            self.held_at_revoke = dict(self.positions)
            self.listener.on_partitions_revoked(self._tps(self.assigned))
            if self.split_join:
                return {}  # JoinGroup in flight: kafka-python returns early with nothing
            self._assign(self.new_assignment)
        elif self.split_join and self.calls == self.rebalance_at + 1:
            self._assign(self.new_assignment)
        out: dict[Any, list[Any]] = {}
        for p in sorted(self.assigned):
            pos = self.positions[p]
            chunk = self.logs[p][pos:pos + min(self.per_call, max_records)]
            if chunk:
                out[TopicPartition(self.topic, p)] = [
                    SimpleNamespace(key=k, value=v, offset=pos + i)
                    for i, (k, v) in enumerate(chunk)
                ]
                self.positions[p] = pos + len(chunk)
                max_records -= len(chunk)
            if max_records <= 0:
                break
        return out

    def seek(self, tp: TopicPartition, offset: int) -> None:
        assert tp.partition in self.assigned, "seek on a partition not assigned"
        self.positions[tp.partition] = offset

    def commit(self, offsets: dict[TopicPartition, Any], timeout_ms: int | None = None) -> None:
        for tp, meta in offsets.items():
            assert tp.partition in self.assigned, f"commit for {tp} which is not assigned"
            self.committed_offsets[tp.partition] = meta.offset

    def commit_async(self, offsets: dict[TopicPartition, Any], callback: Any) -> None:
        self.commit(offsets)
        self.completed.append(lambda: callback(offsets, None))

    def committed(self, tp: TopicPartition, timeout_ms: int | None = None) -> int | None:
        return self.committed_offsets.get(tp.partition)

    def beginning_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: 0 for tp in tps}

    def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: len(self.logs[tp.partition]) for tp in tps}

    def highwater(self, tp: TopicPartition) -> int:
        """The log end, as the last fetch response reports it."""
        return len(self.logs[tp.partition])

    def assignment(self) -> set[TopicPartition]:
        return set(self._tps(self.assigned))

    def position(self, tp: TopicPartition, timeout_ms: int | None = None) -> int | None:
        return self.positions.get(tp.partition)

    def close(self, autocommit: bool = False, timeout_ms: int | None = None) -> None:
        pass


def _event(ts: float, i: int) -> bytes:
    return json.dumps({"ts": ts, "values": [float(i), 1.0, 0.0, -1.0]}).encode()


@pytest.mark.parametrize("split_join", [False, True], ids=["join-in-one-poll", "join-spans-polls"])
def test_rebalance_during_fill_drops_revoked_and_reads_kept_once(
    artifact_dir: Path, split_join: bool
) -> None:
    topics = Topics("unused:9092", "in", "out", "in.dlq")
    settings = settings_for(topics, artifact_dir, max_batch_wait_ms=2000)
    t0 = 1_700_000_000.0
    logs = {p: [(f"k{p}".encode(), _event(t0 + i, i)) for i in range(6)] for p in range(4)}
    service = Service.from_settings(settings)
    consumer = _RebalancingConsumer("in", logs, rebalance_at=3, new_assignment={0, 1},
                                    split_join=split_join)
    producer = _Producer()
    edge = KafkaEdge(settings, service._on_assign, service._on_revoke, service._on_gap,
                     consumer=consumer, producer=producer,  # type: ignore[arg-type]
                     on_dropped=service._on_dropped)
    service.edge = edge
    for _ in range(3):
        batch = edge.poll()
        if batch:
            service.process(batch)

    outputs = [json.loads(v) for t, _, v in producer.sent if t == "out" and v is not None]
    seen = Counter((o["partition"], o["offset"]) for o in outputs)
    assert seen == Counter({(p, o): 1 for p in (0, 1) for o in range(6)}), seen
    assert consumer.committed_offsets == {0: 6, 1: 6}, "nothing committed for revoked ones"
    assert "k2" not in service.store and "k3" not in service.store
    # Everything of partitions 2 and 3 the batch held when the rebalance began was dropped.
    dropped = consumer.held_at_revoke[2] + consumer.held_at_revoke[3]
    assert dropped > 0
    assert service.metrics.rebalance_dropped_total._value.get() == dropped
    # A kept key was stepped once per offset: its state equals one pass over its events.
    reference = Service.from_settings(settings)
    raw = np.array([[float(i), 1.0, 0.0, -1.0] for i in range(6)])
    reference.engine.process(["k0"] * 6, [0] * 6, raw, t0 + np.arange(6.0), t0 + 6)
    slot, ref_slot = service.store.slot("k0"), reference.store.slot("k0")
    assert slot is not None and ref_slot is not None
    torch.testing.assert_close(service.store.h[:, slot], reference.store.h[:, ref_slot])
    reference.http.stop()
    service.http.stop()


def test_second_member_joining_mid_fill_on_a_real_group(
    artifact_dir: Path, kafka_client: str
) -> None:
    """Member A fills long batches (1 s) from a steady stream while member B joins and
    leaves: every offset gets a prediction, A never holds keys of partitions it does not own,
    and duplicates stay within what rejected commits re-delivered."""
    with scenario(artifact_dir) as s:
        slow = s.settings(max_batch_wait_ms=1000, max_batch_events=4096, capacity=8192,
                          kafka_client=kafka_client)
        with running_service(slow) as a:
            deadline = time.monotonic() + 30
            while not a.health.ready() and time.monotonic() < deadline:
                time.sleep(0.05)
            writer = _Writer(s.topics.bootstrap, s.topics.input, 1200, 40, 8.0)
            writer.start()
            time.sleep(2.0)
            with running_service(s.settings(kafka_client=kafka_client)) as b:
                deadline = time.monotonic() + 30
                # B can hold its share a moment before A has taken in its own new assignment.
                while not (b._assigned and a._assigned and not a._assigned & b._assigned) \
                        and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert a._assigned and b._assigned and not a._assigned & b._assigned
                for _ in range(20):  # while both consume: A holds keys of its partitions only
                    owned = set(a._assigned)  # read before the store (released first)
                    held = _partitions_held(a)
                    assert held <= owned, (held, owned)
                    time.sleep(0.1)
            writer.join(timeout=120)
            assert writer.error is None
            inputs = set(writer.offsets)
            outputs = _read_outputs(s.topics.bootstrap, s.topics.output, inputs, 60)
            rejected = sum(
                svc.metrics.commit_failures.labels(r)._value.get()
                for svc in (a, b) for r in ("rebalance", "timeout")
            )
            dropped = a.metrics.rebalance_dropped_total._value.get()
    seen = Counter((o["partition"], o["offset"]) for o in outputs)
    assert inputs <= set(seen), f"missing {len(inputs - set(seen))} offsets"
    duplicates = sum(c - 1 for c in seen.values())
    assert duplicates <= rejected * 4096, (duplicates, rejected, dropped)


def _partitions_held(service: Service) -> set[int]:
    """Partitions of the keys in ``service``'s store, read from another thread."""
    for _ in range(10):
        try:
            return {int(p) for p in service.store._partition[service.store.live_slots()]}
        except RuntimeError:  # the loop changed the key map while it was read
            time.sleep(0.01)
    raise AssertionError("could not read the key map")

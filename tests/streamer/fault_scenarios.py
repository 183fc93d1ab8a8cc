"""Fault scenarios through the embedded broker's injectors, shared by the fault tests and
benchmarks/bench_faults.py.

Each scenario starts a 3-broker embedded cluster, the real service on a thread, and a producer
thread that writes generic events at a steady rate before, during and after the fault. It then
reads the output topic back and reports, per input offset, whether a prediction came (missing),
how many came (duplicates), and how long after the fault ended the first prediction appeared.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from streamer.broker import EmbeddedBroker
from streamer.errors import KafkaEdgeError
from streamer.service import Service

from ..kafka_helpers import Topics, read_topic
from .service_helpers import running_service, scrape, settings_for

COORDINATOR = 1  # the group coordinator; partitions' leaders are spread over brokers 1..3
OTHER_BROKER = 2


@dataclass
class Fault:
    """``inject`` starts the fault, ``heal`` ends it ``duration_s`` later."""

    inject: Callable[[Scenario], None]
    heal: Callable[[Scenario], None]
    duration_s: float


@dataclass
class Scenario:
    broker: EmbeddedBroker
    topics: Topics
    model: Path
    group_id: str
    extra: ExitStack = field(default_factory=ExitStack)

    def settings(self, **overrides: Any) -> Any:
        base: dict[str, Any] = dict(
            group_id=self.group_id, session_timeout_ms=3000, heartbeat_interval_ms=500,
            request_timeout_ms=6000, commit_timeout_s=2.0, retry_backoff_max_s=1.0,
            flush_timeout_s=30.0, max_batch_wait_ms=20,
        )
        base.update(overrides)
        return settings_for(self.topics, self.model, **base)


@dataclass(frozen=True)
class Report:
    name: str
    events_in: int
    predictions_out: int
    duplicates: int
    missing: int
    recovery_s: float | None  # fault end -> first prediction emitted after it
    alive: bool  # the first service was running (and healthy) after the fault
    ready: bool  # ... and ready again
    not_ready_reasons: frozenset[str]  # what /readyz said during the fault


def _commit_errors(*errors: str) -> Fault:
    return Fault(lambda s: s.broker.push_request_errors("OffsetCommit", list(errors)),
                 lambda s: s.broker.clear_request_errors("OffsetCommit"), 2.0)


@contextmanager
def _member(settings: Any) -> Iterator[Service]:
    """A member that joins for the fault and leaves after it. Leaving while the group still
    rebalances it may fail to commit its last offsets: it then says so (an unclean drain), and
    those offsets are re-delivered, which the report counts as duplicates."""
    try:
        with running_service(settings) as service:
            yield service
    except KafkaEdgeError as exc:
        if "drain did not finish cleanly" not in str(exc):
            raise


def _add_member(s: Scenario) -> None:
    s.extra.enter_context(_member(s.settings()))


def _members(s: Scenario) -> None:
    """A second and a third member join 1 s apart."""
    _add_member(s)
    time.sleep(1.0)
    _add_member(s)


REQUEST_ERRORS = {
    "Produce": ["REQUEST_TIMED_OUT"] * 3,
    "Fetch": ["NOT_LEADER_OR_FOLLOWER"] * 3,
    "Heartbeat": ["REBALANCE_IN_PROGRESS"],  # the member must rejoin: JoinGroup, SyncGroup
    "JoinGroup": ["COORDINATOR_NOT_AVAILABLE"] * 2,
    "SyncGroup": ["REBALANCE_IN_PROGRESS"],
}


def _request_errors(s: Scenario) -> None:
    for api, errors in REQUEST_ERRORS.items():
        s.broker.push_request_errors(api, errors)


def _clear_request_errors(s: Scenario) -> None:
    for api in REQUEST_ERRORS:
        s.broker.clear_request_errors(api)


def _rtt(ms: int) -> Callable[[Scenario], None]:
    def set_rtt(s: Scenario) -> None:
        for broker_id in range(1, 4):
            s.broker.set_rtt(ms, broker_id)
    return set_rtt


FAULTS: dict[str, Fault] = {
    "broker_down": Fault(lambda s: s.broker.set_broker_down(OTHER_BROKER),
                         lambda s: s.broker.set_broker_up(OTHER_BROKER), 10.0),
    "coordinator_down": Fault(lambda s: s.broker.set_broker_down(COORDINATOR),
                              lambda s: s.broker.set_broker_up(COORDINATOR), 10.0),
    "commit_rebalance_in_progress": _commit_errors(*["REBALANCE_IN_PROGRESS"] * 3),
    "commit_illegal_generation": _commit_errors("ILLEGAL_GENERATION"),
    "commit_request_timed_out": _commit_errors(*["REQUEST_TIMED_OUT"] * 8),
    "members_join_and_leave": Fault(_members, lambda s: s.extra.close(), 6.0),
    "request_errors": Fault(_request_errors, _clear_request_errors, 3.0),
    "brokers_slow_500ms": Fault(_rtt(500), _rtt(0), 5.0),
}


def _event(i: int) -> bytes:
    return json.dumps({"ts": time.time(), "values": [float(i % 7), 1.0, 0.5, -1.0]}).encode()


class _Writer(threading.Thread):
    """Writes ``n`` events over ``keys`` keys at a steady rate for ``span_s`` seconds."""

    def __init__(self, bootstrap: str, topic: str, n: int, keys: int, span_s: float) -> None:
        super().__init__(name="fault-writer", daemon=True)
        self.bootstrap, self.topic, self.n, self.keys, self.span_s = (
            bootstrap, topic, n, keys, span_s)
        self.offsets: list[tuple[int, int]] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            producer = KafkaProducer(bootstrap_servers=self.bootstrap, acks="all", linger_ms=5,
                                     request_timeout_ms=30_000, retries=1_000_000,
                                     max_in_flight_requests_per_connection=1,
                                     # a retried request must not write an input twice
                                     enable_idempotence=True)
            start = time.monotonic()
            futures = []
            for i in range(self.n):
                delay = start + self.span_s * i / self.n - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                futures.append(producer.send(self.topic, key=f"k{i % self.keys}".encode(),
                                             value=_event(i)))
            producer.flush(timeout=120)
            for f in futures:
                meta = f.get(timeout=60)
                self.offsets.append((meta.partition, meta.offset))
            producer.close(timeout=5)
        except BaseException as exc:  # surfaced by the scenario
            self.error = exc


def _read_outputs(bootstrap: str, topic: str, expect: set[tuple[int, int]],
                  timeout_s: float, settle_s: float = 1.0,
                  isolation_level: str = "read_uncommitted") -> list[dict[str, Any]]:
    """Every prediction until each expected input offset has one (then ``settle_s`` more, to
    catch a late duplicate)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                             fetch_max_wait_ms=50, check_crcs=False,
                             isolation_level=isolation_level)
    parts = consumer.partitions_for_topic(topic) or set()
    consumer.assign([TopicPartition(topic, p) for p in parts])
    consumer.seek_to_beginning()
    out: list[dict[str, Any]] = []
    covered: set[tuple[int, int]] = set()
    deadline = time.monotonic() + timeout_s
    settle: float | None = None
    while time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=100).values():
            for r in batch:
                value = json.loads(r.value)
                out.append(value)
                covered.add((value["partition"], value["offset"]))
        if settle is None and expect <= covered:
            settle = time.monotonic() + settle_s
        if settle is not None and time.monotonic() >= settle:
            break
    consumer.close()
    return out


@contextmanager
def scenario(model: Path) -> Iterator[Scenario]:
    with EmbeddedBroker(num_brokers=3) as broker:
        name = f"f-{uuid.uuid4().hex[:8]}"
        topics = Topics(broker.bootstrap_servers, name, f"{name}.out", f"{name}.dlq")
        broker.create_topic(topics.input, partitions=4, replication_factor=3)
        broker.create_topic(topics.output, partitions=4, replication_factor=3)
        broker.create_topic(topics.dlq, partitions=1, replication_factor=3)
        group = f"g-{name}"
        broker.set_group_coordinator(group, COORDINATOR)
        s = Scenario(broker, topics, model, group)
        try:
            yield s
        finally:
            s.extra.close()


def _wait_ready(service: Service, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not service.health.ready():
        if time.monotonic() > deadline:
            raise AssertionError(f"service not ready: {service.health.not_ready_reason()}")
        time.sleep(0.05)


def run_fault(name: str, model: Path, n_events: int = 1500, keys: int = 40,
              before_s: float = 2.0, after_s: float = 2.0) -> Report:
    """Run scenario ``name`` (a key of FAULTS) and measure what came out."""
    fault = FAULTS[name]
    with scenario(model) as s, running_service(s.settings()) as service:
        _wait_ready(service)
        # Events before and during the fault, then (once it has ended) the rest.
        span = before_s + fault.duration_s
        n_during = int(n_events * span / (span + after_s))
        writer = _Writer(s.topics.bootstrap, s.topics.input, n_during, keys, span)
        writer.start()
        time.sleep(before_s)
        fault.inject(s)
        reasons: set[str] = set()
        until = time.monotonic() + fault.duration_s
        while time.monotonic() < until:  # what /readyz said during the fault
            if not service.health.ready():
                reasons.add(service.health.not_ready_reason())
            time.sleep(0.05)
        fault.heal(s)
        healed = time.time()
        tail = _Writer(s.topics.bootstrap, s.topics.input, n_events - n_during, keys, after_s)
        tail.start()
        for w in (writer, tail):
            w.join(timeout=180)
            assert w.error is None, f"the test's producer failed: {w.error!r}"
        # Every input record in the topic, not only those the writer's futures reported: a
        # broker going down under the writer's retries can leave an input written twice.
        recorded = set(writer.offsets) | set(tail.offsets)
        inputs = recorded | {(r.partition, r.offset) for r in read_topic(
            s.topics.bootstrap, s.topics.input, expect=len(recorded), timeout_s=30)}
        outputs = _read_outputs(s.topics.bootstrap, s.topics.output, inputs, timeout_s=90)
        alive = scrape(service.http.port, "/healthz")[0] == 200
        ready = scrape(service.http.port, "/readyz")[0] == 200
    seen = Counter((o["partition"], o["offset"]) for o in outputs)
    after = [o["emitted_at"] for o in outputs if o["emitted_at"] >= healed]
    return Report(
        name=name, events_in=len(inputs), predictions_out=len(outputs),
        duplicates=sum(c - 1 for c in seen.values() if c > 1),
        missing=len(inputs - set(seen)),
        recovery_s=(min(after) - healed) if after else None, alive=alive, ready=ready,
        not_ready_reasons=frozenset(reasons),
    )

"""Scale-out and crashes with durable state, through real ``streamer run`` processes.

Three processes share one consumer group on the embedded broker: A starts on a backlog, B joins
mid-stream, A is SIGKILLed, C joins, B is SIGTERMed, C finishes. Keys move between them only
through the changelog. Every emitted prediction is compared, per (partition, offset), with an
uninterrupted in-process run. Shared by the e2e test and benchmarks/bench_state.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Protocol

from kafka import KafkaConsumer, TopicPartition

from streamer.broker import EmbeddedBroker

from ..kafka_helpers import Topics, produce, read_topic
from ..state_reference import compare, make_events, uninterrupted
from ..streamer.fault_scenarios import _read_outputs


def _process(topics: Topics, artifact_dir: Path, group: str,
             changelog: bool = True, guarantee: str = "at_least_once",
             interval_s: str = "0.5", replica: str = "",
             client: str = "kafka-python") -> subprocess.Popen[str]:
    env = {
        **os.environ, "STREAMER_DEVICE": "cpu", "STREAMER_DLQ_TOPIC": topics.dlq,
        "STREAMER_CHANGELOG": str(changelog).lower(), "STREAMER_CHECKPOINT_INTERVAL_S": interval_s,
        "STREAMER_PROCESSING_GUARANTEE": guarantee,
        "STREAMER_SESSION_TIMEOUT_MS": "3000", "STREAMER_HEARTBEAT_INTERVAL_MS": "500",
        "STREAMER_REQUEST_TIMEOUT_MS": "6000", "STREAMER_CHECK_CRCS": "false",
        "STREAMER_LOG_LEVEL": "INFO", "STREAMER_KAFKA_CLIENT": client,
        **({"STREAMER_TRANSACTIONAL_ID": f"{group}-{replica}"} if replica else {}),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "streamer.cli", "run", "--bootstrap-servers", topics.bootstrap,
         "--input-topic", topics.input, "--output-topic", topics.output, "--group-id", group,
         "--model", str(artifact_dir), "--metrics-address", "127.0.0.1:0",
         "--max-batch-events", "50"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )


def scale_out_with_crashes(
    broker: EmbeddedBroker, artifact_dir: Path, n: int = 4000, n_keys: int = 100,
    changelog: bool = True, check: bool = True, client: str = "kafka-python",
    guarantee: str = "at_least_once",
) -> dict[str, int]:
    """Run the scenario; returns events, missing, duplicates, differing (the goal: 0, any,
    0 duplicates with other values, 0). ``changelog=False`` shows what is lost without it;
    ``check`` raises (with the processes' logs) when anything is missing or differs;
    ``client`` is the processes' ``kafka_client``, ``guarantee`` their processing guarantee
    (predictions are read read_uncommitted: aborted ones count as duplicates)."""
    name = f"ev-{uuid.uuid4().hex[:8]}"
    topics = Topics(broker.bootstrap_servers, name, f"{name}.out", f"{name}.dlq")
    group = f"g-{name}"
    for topic, parts in [(topics.input, 4), (topics.output, 4), (topics.dlq, 1),
                         (f"{group}-state", 4)]:
        broker.create_topic(topic, partitions=parts)
    records = make_events(n, n_keys, seed=11)
    quarter = n // 4
    coords = produce(topics.bootstrap, topics.input, records[:quarter])
    procs: dict[str, subprocess.Popen[str]] = {}
    logs: dict[str, str] = {}
    fed = threading.Event()

    def feed(lo: int, hi: int) -> None:
        for start in range(lo, hi, 100):
            coords.extend(produce(topics.bootstrap, topics.input,
                                  records[start:min(start + 100, hi)]))
            time.sleep(0.05)
        fed.set()

    try:
        procs["A"] = _process(topics, artifact_dir, group, changelog, guarantee, client=client)
        if not read_topic(topics.bootstrap, topics.output, expect=1, timeout_s=60, settle_s=0):
            raise AssertionError("A never predicted")
        feeder = threading.Thread(target=feed, args=(quarter, 3 * quarter), daemon=True)
        feeder.start()
        # B joins mid-stream
        procs["B"] = _process(topics, artifact_dir, group, changelog, guarantee, client=client)
        time.sleep(4)
        procs["A"].kill()  # SIGKILL: no drain, no checkpoint
        logs["A"] = procs["A"].communicate(timeout=30)[0]
        procs["C"] = _process(topics, artifact_dir, group, changelog, guarantee, client=client)
        time.sleep(4)
        procs["B"].send_signal(signal.SIGTERM)
        logs["B"] = procs["B"].communicate(timeout=60)[0]
        feeder.join(timeout=120)
        coords.extend(produce(topics.bootstrap, topics.input, records[3 * quarter:]))
        outputs = _read_outputs(topics.bootstrap, topics.output, set(coords), timeout_s=90)
        procs["C"].send_signal(signal.SIGTERM)
        logs["C"] = procs["C"].communicate(timeout=60)[0]
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert len(coords) == n
    reference, _ = uninterrupted(artifact_dir, records, coords)
    result = compare(outputs, reference)
    result["restores"] = sum(log.count("restored partition") for log in logs.values())
    if check and (result["missing"] or result["differing"]):
        tail = {k: v[-3000:] for k, v in logs.items()}
        raise AssertionError(f"{result}\n{tail}")
    return result


def _read_committed(bootstrap: str, topic: str, expect: set[tuple[int, int]],
                    timeout_s: float) -> list[dict]:
    """Predictions a read_committed consumer sees, until every expected offset has one
    (then 2 s more, to catch a late duplicate)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                             fetch_max_wait_ms=50, check_crcs=False,
                             isolation_level="read_committed")
    consumer.assign([TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)])
    consumer.seek_to_beginning()
    out: list[dict] = []
    deadline = time.monotonic() + timeout_s
    settle: float | None = None
    while time.monotonic() < deadline and (settle is None or time.monotonic() < settle):
        for batch in consumer.poll(timeout_ms=100).values():
            out.extend(json.loads(r.value) for r in batch)
        if settle is None and expect <= {(o["partition"], o["offset"]) for o in out}:
            settle = time.monotonic() + 2
    consumer.close()
    return out


class Cluster(Protocol):
    bootstrap_servers: str

    def create_topic(self, name: str, partitions: int) -> None: ...


def exactly_once_sigkill(
    cluster: Cluster, artifact_dir: Path, n: int = 3000, n_keys: int = 80,
    client: str = "kafka-python",
) -> dict[str, int]:
    """exactly_once: A is SIGKILLed mid-stream, B (same transactional id, as a restarted
    replica) takes over. Returns what a read_committed reader of the predictions sees: on
    Apache Kafka each input offset once; the embedded broker does not filter aborted
    transactions (see the test of that), so there duplicates can show, with equal values."""
    name = f"eos-{uuid.uuid4().hex[:8]}"
    topics = Topics(cluster.bootstrap_servers, name, f"{name}.out", f"{name}.dlq")
    group = f"g-{name}"
    for topic, parts in [(topics.input, 4), (topics.output, 4), (topics.dlq, 1),
                         (f"{group}-state", 4)]:
        cluster.create_topic(topic, parts)
    records = make_events(n, n_keys, seed=13)
    half = n // 2
    coords = produce(topics.bootstrap, topics.input, records[:half])
    logs: dict[str, str] = {}
    procs: dict[str, subprocess.Popen[str]] = {}
    try:
        procs["A"] = _process(topics, artifact_dir, group, True, "exactly_once", "0.2", "r0",
                              client)
        if not read_topic(topics.bootstrap, topics.output, expect=200, timeout_s=60,
                          settle_s=0):
            raise AssertionError("A never predicted")
        coords.extend(produce(topics.bootstrap, topics.input, records[half:3 * n // 4]))
        time.sleep(1)
        procs["A"].kill()
        logs["A"] = procs["A"].communicate(timeout=30)[0]
        procs["B"] = _process(topics, artifact_dir, group, True, "exactly_once", "0.2", "r0",
                              client)
        coords.extend(produce(topics.bootstrap, topics.input, records[3 * n // 4:]))
        outputs = _read_committed(topics.bootstrap, topics.output, set(coords), timeout_s=90)
        procs["B"].send_signal(signal.SIGTERM)
        logs["B"] = procs["B"].communicate(timeout=60)[0]
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.communicate()
    reference, _ = uninterrupted(artifact_dir, records, coords)
    result = compare(outputs, reference)
    if result["missing"] or result["differing"]:
        raise AssertionError(f"{result}\n{ {k: v[-3000:] for k, v in logs.items()} }")
    return result

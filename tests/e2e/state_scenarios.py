"""Scale-out and crashes with durable state, through real ``streamer run`` processes.

Three processes share one consumer group on the embedded broker: A starts on a backlog, B joins
mid-stream, A is SIGKILLed, C joins, B is SIGTERMed, C finishes. Keys move between them only
through the changelog. Every emitted prediction is compared, per (partition, offset), with an
uninterrupted in-process run. Shared by the e2e test and benchmarks/bench_state.py.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Protocol

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


RESTORED = r"restored partition \d+: \d+ keys up to input offset \d+"  # from a checkpoint


class _Output:
    """A process's log, read line by line as it comes (so a scenario can wait on it)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.lines.append(line)

    def text(self) -> str:
        self._thread.join(timeout=0)
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not re.search(pattern, self.text()):
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} not within {timeout_s:.0f} s:\n{self.text()[-3000:]}")
            time.sleep(0.1)


def _stop(proc: subprocess.Popen[str], out: _Output, sig: int | None) -> str:
    """Signal ``proc`` (None: SIGKILL), wait for it, return its whole log."""
    if sig is None:
        proc.kill()
    else:
        proc.send_signal(sig)
    proc.wait(timeout=60)
    out._thread.join(timeout=10)
    return out.text()


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

    out: dict[str, _Output] = {}

    def start(member: str) -> None:
        procs[member] = _process(topics, artifact_dir, group, changelog, guarantee,
                                 client=client)
        out[member] = _Output(procs[member])

    def took_over(member: str) -> None:
        """Wait until ``member`` restored partitions it took over (with changelog)."""
        if changelog:
            out[member].wait_for(RESTORED, 60, f"{member} restoring from a checkpoint")
        else:
            time.sleep(4)

    try:
        start("A")
        if not read_topic(topics.bootstrap, topics.output, expect=1, timeout_s=60, settle_s=0):
            raise AssertionError("A never predicted")
        feeder = threading.Thread(target=feed, args=(quarter, 3 * quarter), daemon=True)
        feeder.start()
        start("B")  # B joins mid-stream and takes partitions over from A
        took_over("B")
        logs["A"] = _stop(procs["A"], out["A"], None)  # SIGKILL: no drain, no checkpoint
        start("C")
        took_over("C")
        logs["B"] = _stop(procs["B"], out["B"], signal.SIGTERM)
        feeder.join(timeout=120)
        coords.extend(produce(topics.bootstrap, topics.input, records[3 * quarter:]))
        outputs = _read_outputs(topics.bootstrap, topics.output, set(coords), timeout_s=90)
        logs["C"] = _stop(procs["C"], out["C"], signal.SIGTERM)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    assert len(coords) == n
    reference, _ = uninterrupted(artifact_dir, records, coords)
    result = compare(outputs, reference)
    # Restores from a checkpoint (not cold starts) by the members that took partitions over.
    for member in ("B", "C"):
        result[f"restores_{member}"] = len(re.findall(RESTORED, logs.get(member, "")))
    if check and (result["missing"] or result["differing"]):
        tail = {k: v[-3000:] for k, v in logs.items()}
        raise AssertionError(f"{result}\n{tail}")
    return result


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
        outputs = _read_outputs(topics.bootstrap, topics.output, set(coords), timeout_s=90,
                                settle_s=2.0, isolation_level="read_committed")
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

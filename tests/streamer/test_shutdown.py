"""SIGTERM drains within ``drain_timeout_s`` even when the brokers are unreachable, and the exit
status tells the truth: non-zero, and no "stopped cleanly", when outputs were still in flight."""

from __future__ import annotations

import json
import signal
import time
import uuid
from pathlib import Path

import pytest

from streamer.broker import EmbeddedBroker

from ..kafka_helpers import produce, read_topic
from .test_cli import _streamer

pytestmark = pytest.mark.integration

DRAIN_S = 3.0


def _records(n: int) -> list[tuple[bytes | None, bytes | None]]:
    now = time.time()
    return [(f"k{i % 5}".encode(), json.dumps({"ts": now, "values": [i, 1, 0, -1]}).encode())
            for i in range(n)]


def test_sigterm_with_brokers_down_exits_nonzero_within_drain_timeout(
    artifact_dir: Path,
) -> None:
    with EmbeddedBroker(num_brokers=3) as broker:
        name = f"s-{uuid.uuid4().hex[:8]}"
        out_topic, group = f"{name}.out", f"g-{name}"
        for topic, parts in ((name, 2), (out_topic, 2), (f"{name}.dlq", 1)):
            broker.create_topic(topic, partitions=parts)
        # Inputs and the coordinator on broker 1, outputs on broker 2: with broker 2 down the
        # service still reads but its predictions cannot be acknowledged.
        for p in range(2):
            broker.set_partition_leader(name, p, 1)
            broker.set_partition_leader(out_topic, p, 2)
        broker.set_partition_leader(f"{name}.dlq", 0, 1)
        broker.set_group_coordinator(group, 1)
        proc = _streamer(
            "run", "--bootstrap-servers", broker.bootstrap_servers, "--input-topic", name,
            "--output-topic", out_topic, "--group-id", group, "--model", str(artifact_dir),
            "--device", "cpu", "--metrics-address", "127.0.0.1:0",
            "--drain-timeout-s", str(DRAIN_S), "--session-timeout-ms", "3000",
            "--heartbeat-interval-ms", "500", "--request-timeout-ms", "6000",
        )
        try:
            produce(broker.bootstrap_servers, name, _records(10))
            assert len(read_topic(broker.bootstrap_servers, out_topic, expect=10,
                                  timeout_s=60, settle_s=0)) >= 10, "never predicted"
            broker.set_broker_down(2)
            produce(broker.bootstrap_servers, name, _records(20))
            time.sleep(2.0)  # the service reads them and waits for acks that cannot come
            broker.set_broker_down(1)
            broker.set_broker_down(3)
            proc.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            out, _ = proc.communicate(timeout=60)
            elapsed = time.monotonic() - sent
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 1, out
    assert "received SIGTERM, draining" in out, out
    assert "unacknowledged" in out or "not acknowledged" in out, out
    assert "stopped cleanly" not in out, out
    assert elapsed < DRAIN_S + 7, f"took {elapsed:.1f} s to stop:\n{out}"

"""``streamer bench`` runs end to end (tiny sizes) and prints the side-by-side table: the relay,
both clients, bytes per key and the per-stage shares. The figures themselves come from running
the command, never from a test."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.integration
def test_bench_prints_relay_and_both_clients_side_by_side() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "streamer.cli", "bench", "--events", "1500", "--keys", "50",
         "--rate", "300", "--seconds", "1.5", "--repeats", "1", "--brokers", "1",
         "--partitions", "2"],
        capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    table = out[out.index("streamer bench:"):]
    rows = {line.split()[0]: line.split()[1:] for line in table.splitlines()[2:5]}
    assert set(rows) == {"relay", "kafka-python", "confluent"}
    for name, cells in rows.items():
        rate, ratio, p50, p95, p99, p99_ratio = (float(c.replace(",", "")) for c in cells)
        assert rate > 0 and 0 < p50 <= p95 <= p99, name
    assert rows["relay"][1] == "1.00" and rows["relay"][5] == "1.00"
    assert re.search(r"state bytes per key: [1-9][\d,]*\n", table)
    for client in ("kafka-python", "confluent"):
        for phase in ("full speed", "300 ev/s"):
            line = next(x for x in table.splitlines()
                        if x.split()[:1] == [client] and phase in x)
            shares = [float(x.rstrip("%")) for x in line.split()[3:] if x.endswith("%")]
            assert len(shares) == 6 and abs(sum(shares) - 100) < 0.5, line


@pytest.mark.integration
def test_a_streamer_that_stops_on_its_own_ends_the_wait_at_once(artifact_dir: Path) -> None:
    """A service that refuses to start (here: changelog on, no changelog topic) ends the bench's
    wait with its reason within seconds, instead of the bench waiting 600 s for outputs."""
    import time

    from streamer.bench import BenchConfig, StreamerUnderTest, _wait
    from streamer.broker import EmbeddedBroker

    with EmbeddedBroker(num_brokers=1) as broker:
        for topic in ("b.in", "b.out", "b.in.dlq"):
            broker.create_topic(topic, 2)
        cfg = BenchConfig(clients=("kafka-python",), overrides=(("changelog", "true"),))
        runner = StreamerUnderTest(broker.bootstrap_servers, artifact_dir, "b.in", "b.out",
                                   "b-g", "kafka-python", cfg).start()
        started = time.monotonic()
        try:
            with pytest.raises(RuntimeError, match="changelog topic 'b-g-state' does not exist"):
                _wait(lambda: False, 120, "an output", runner=runner)
        finally:
            runner.close()
    assert time.monotonic() - started < 60

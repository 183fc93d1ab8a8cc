"""The console script as an operator runs it: a real process, real signals, real broker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from ..kafka_helpers import Topics, json_values, produce, read_topic
from .service_helpers import running_service, settings_for


def _streamer(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "streamer.cli", *args], stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})},
    )


def test_sigterm_mid_stream_loses_nothing(topics: Topics, artifact_dir: Path) -> None:
    n = 4000
    now = time.time()
    records = [
        (f"k{i % 37}".encode(),
         json.dumps({"ts": now + i * 1e-4, "values": [i % 7, 1.0, -1.0, 0.5]}).encode())
        for i in range(n)
    ]
    coords: list[tuple[int, int]] = []

    def feed() -> None:  # keep events arriving while the process is told to stop
        for lo in range(0, n, 200):
            coords.extend(produce(topics.bootstrap, topics.input, records[lo:lo + 200]))
            time.sleep(0.05)

    proc = _streamer(
        "run", "--bootstrap-servers", topics.bootstrap, "--input-topic", topics.input,
        "--output-topic", topics.output, "--group-id", "sigterm", "--model", str(artifact_dir),
        "--metrics-address", "127.0.0.1:0", "--max-batch-events", "100",
        env={"STREAMER_DEVICE": "cpu", "STREAMER_DLQ_TOPIC": topics.dlq},
    )
    feeder = threading.Thread(target=feed)
    feeder.start()
    first = read_topic(topics.bootstrap, topics.output, expect=300, timeout_s=60, settle_s=0)
    assert len(first) >= 300, "the process never started predicting"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "stopped cleanly" in out
    feeder.join()

    settings = settings_for(topics, artifact_dir, group_id="sigterm")
    with running_service(settings):  # a successor in the same group picks up the rest
        records_out = read_topic(topics.bootstrap, topics.output, expect=n, timeout_s=90)
    seen = [(o["partition"], o["offset"]) for o in json_values(records_out)]
    assert len(coords) == n
    missing = set(coords) - set(seen)
    assert not missing, f"{len(missing)} input offsets have no prediction"
    assert len(seen) == n, "a graceful stop commits exactly what was emitted: no duplicates"


def test_bad_setting_fails_at_start_naming_the_field(artifact_dir: Path) -> None:
    proc = _streamer("run", "--max-batch-events", "0", "--model", str(artifact_dir))
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "max_batch_events" in out and "STREAMER_MAX_BATCH_EVENTS" in out

    proc = _streamer("run", "--model", str(artifact_dir), env={"STREAMER_DEVICE": "tpu"})
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "device" in out


def test_help_names_env_vars() -> None:
    proc = _streamer("run", "--help")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    for env in ("STREAMER_BOOTSTRAP_SERVERS", "STREAMER_INPUT_TOPIC", "STREAMER_MODEL",
                "STREAMER_METRICS_ADDRESS"):
        assert env in out


def test_broker_command_prints_bootstrap_and_serves() -> None:
    proc = _streamer("broker", "--topics", "a,b", "--partitions", "2")
    assert proc.stdout is not None
    bootstrap = proc.stdout.readline().strip()
    try:
        assert bootstrap.startswith("127.0.0.1:")
        coords = produce(bootstrap, "a", [(b"k", b"{}")])
        assert coords[0][1] == 0
        assert len(read_topic(bootstrap, "a", expect=1, timeout_s=20, settle_s=0)) == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert proc.returncode == 0

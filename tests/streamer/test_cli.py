"""The console script as an operator runs it: a real process, real signals, real broker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from streamer.cli import stop_on_signals

from ..kafka_helpers import produce, read_topic


def _streamer(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "streamer.cli", *args], stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})},
    )


def test_bad_setting_fails_at_start_naming_the_field(artifact_dir: Path) -> None:
    proc = _streamer("run", "--max-batch-events", "0", "--model", str(artifact_dir))
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "max_batch_events" in out and "STREAMER_MAX_BATCH_EVENTS" in out

    proc = _streamer("run", "--model", str(artifact_dir), env={"STREAMER_DEVICE": "tpu"})
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "device" in out


def test_a_bad_bench_setting_names_the_benchs_set_option() -> None:
    """``streamer bench`` takes streamer settings as ``--set NAME=VALUE``: its error says so,
    not ``streamer run``'s flag; it exits 2 before any broker or relay starts."""
    proc = _streamer("bench", "--set", "max_batch_events=abc", "--phases", "full")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2, out
    line = out.strip().splitlines()[-1]
    assert "'max_batch_events'" in line and "'abc'" in line
    assert "--set max_batch_events=VALUE" in line
    assert "--max-batch-events" not in line

    proc = _streamer("bench", "--phases", "full", env={"STREAMER_MAX_BATCH_EVENTS": "0"})
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2, out
    assert "STREAMER_MAX_BATCH_EVENTS" in out and "--max-batch-events" not in out


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


def test_stop_on_signals_sets_the_event_and_restores_handlers() -> None:
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig in (signal.SIGTERM, signal.SIGINT):
        with stop_on_signals() as stop:
            assert not stop.is_set()
            os.kill(os.getpid(), sig)
            assert stop.wait(5), sig.name
        assert {s: signal.getsignal(s) for s in before} == before
    given = threading.Event()
    with stop_on_signals(given) as stop:
        assert stop is given
    # Off the main thread no handler can be installed; the block still runs.
    seen: list[bool] = []
    worker = threading.Thread(target=lambda: seen.append(_enter_off_main_thread()))
    worker.start()
    worker.join(5)
    assert seen == [True]


def _enter_off_main_thread() -> bool:
    with stop_on_signals() as stop:
        return not stop.is_set()

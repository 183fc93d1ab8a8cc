"""The scheduler: failures are counted and retried, metrics are scraped or pushed over HTTP."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from streamer.metrics import HealthState, MetricsServer
from streamer.registry import Registry
from tests.trainer.conftest import fast_settings
from trainer.cli import main
from trainer.pipeline import run_training
from trainer.schedule import RunSummary, Scheduler, TrainerMetrics


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return _samples(resp.read().decode())


def test_a_failed_run_is_counted_and_the_next_interval_runs_again(
    tmp_path: Path, generic_file: Path
) -> None:
    """The first run fails for real (its history file is missing); the file then appears and
    the next interval trains and publishes. Metrics are read back over HTTP."""
    history = tmp_path / "history.jsonl"
    settings = fast_settings(tmp_path / "models", epochs=1)

    def run_once() -> RunSummary:
        run = run_training(settings, [history])
        return RunSummary(run.outcome, run.version, run.val_mae)

    metrics = TrainerMetrics()
    health = HealthState()
    stop = threading.Event()
    scheduler = Scheduler(run_once, every_s=1.0, metrics=metrics, stop=stop, max_runs=3,
                          on_beat=health.beat)
    with MetricsServer(metrics.registry, health, "127.0.0.1", 0) as server:
        thread = threading.Thread(target=scheduler.run)
        thread.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if _scrape(server.port).get(("trainer_runs_total", (("outcome", "failed"),))):
                break
            time.sleep(0.02)
        after_failure = _scrape(server.port)
        shutil.copy(generic_file, history)
        thread.join(timeout=60)
        assert not thread.is_alive()
        final = _scrape(server.port)
    runs = {o: final[("trainer_runs_total", (("outcome", o),))]
            for o in ("success", "failed", "refused")}
    assert after_failure[("trainer_runs_total", (("outcome", "failed"),))] == 1
    assert after_failure[("trainer_last_success_timestamp_seconds", ())] == 0
    assert runs["failed"] == 1 and runs["success"] >= 1 and sum(runs.values()) == 3
    assert final[("trainer_run_duration_seconds_count", ())] == 3
    assert final[("trainer_last_success_timestamp_seconds", ())] > time.time() - 60
    assert final[("trainer_validation_mae", ())] > 0
    current = Registry(tmp_path / "models", "default").current()
    published = [labels for (name, labels), v in final.items()
                 if name == "trainer_published_version_info" and v == 1]
    assert published == [(("version", current),)]  # one series: the latest published


def test_refused_runs_are_counted_as_refused() -> None:
    metrics = TrainerMetrics()
    outcomes = iter([RunSummary("success", "v1", 0.5), RunSummary("refused", None, 0.7),
                     RunSummary("success", "v2", 0.4)])
    Scheduler(lambda: next(outcomes), every_s=0.01, metrics=metrics, max_runs=3).run()
    reg = metrics.registry
    assert reg.get_sample_value("trainer_runs_total", {"outcome": "refused"}) == 1
    assert reg.get_sample_value("trainer_runs_total", {"outcome": "success"}) == 2
    assert reg.get_sample_value("trainer_published_version_info", {"version": "v2"}) == 1
    assert reg.get_sample_value("trainer_published_version_info", {"version": "v1"}) is None
    assert reg.get_sample_value("trainer_validation_mae") == 0.4


def test_stop_ends_the_wait_between_runs() -> None:
    stop = threading.Event()
    scheduler = Scheduler(lambda: RunSummary("refused"), every_s=3600, metrics=TrainerMetrics(),
                          stop=stop)
    thread = threading.Thread(target=scheduler.run)
    thread.start()
    time.sleep(0.2)
    stop.set()
    thread.join(timeout=5)
    assert not thread.is_alive() and scheduler.runs == 1


class _Pushgateway(BaseHTTPRequestHandler):
    received: list[tuple[str, str, str]] = []

    def do_PUT(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"])).decode()
        self.received.append((self.command, self.path, body))
        self.send_response(200)
        self.end_headers()

    do_POST = do_PUT

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def pushgateway() -> Iterator[tuple[str, list[tuple[str, str, str]]]]:
    received: list[tuple[str, str, str]] = []
    handler = type("Handler", (_Pushgateway,), {"received": received})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", received
    finally:
        server.shutdown()
        server.server_close()


def test_schedule_cli_pushes_to_a_pushgateway(
    tmp_path: Path, generic_file: Path, pushgateway: tuple[str, list[tuple[str, str, str]]]
) -> None:
    url, received = pushgateway
    code = main([
        "schedule", "--every", "0.2s", "--max-runs", "2", "--input", str(generic_file),
        "--registry", str(tmp_path / "models"), "--hidden", "16", "--layers", "1",
        "--epochs", "3", "--seq-len", "32", "--device", "cpu", "--pushgateway", url,
    ])
    assert code == 0
    assert len(received) == 2
    method, path, body = received[-1]
    assert method == "POST" and path == "/metrics/job/trainer"
    samples = _samples(body)
    assert sum(v for (n, _), v in samples.items() if n == "trainer_runs_total") == 2
    assert samples[("trainer_runs_total", (("outcome", "success"),))] >= 1


@pytest.fixture
def real_pushgateway(tmp_path: Path) -> Iterator[str]:
    """The real Prometheus Pushgateway binary (Debian package prometheus-pushgateway)."""
    binary = shutil.which("prometheus-pushgateway") or shutil.which("pushgateway")
    if binary is None:
        pytest.skip("no Pushgateway binary: apt-get install prometheus-pushgateway (.ci/run does)")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([binary, f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"{url}/-/ready", timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "pushgateway did not start"
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _gateway(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
        samples = _samples(resp.read().decode())
    return {(n, tuple(kv for kv in labels if kv[0] not in ("instance",))): v
            for (n, labels), v in samples.items() if n.startswith("trainer_")}


def test_one_shot_runs_push_and_a_failed_run_keeps_the_last_success(
    tmp_path: Path, generic_file: Path, real_pushgateway: str
) -> None:
    """The k8s CronJob runs `trainer schedule --max-runs 1 --pushgateway ...` once per slot:
    a success is pushed, and a later failed run adds its failure without erasing it."""
    common = ["--registry", str(tmp_path / "models"), "--hidden", "8", "--layers", "1",
              "--epochs", "3", "--seq-len", "32", "--device", "cpu",
              "--pushgateway", real_pushgateway]
    assert main(["schedule", "--every", "6h", "--max-runs", "1", "--input",
                 str(generic_file), "--force", *common]) == 0  # a success: published
    last = ("trainer_last_success_timestamp_seconds", (("job", "trainer"),))
    first = _gateway(real_pushgateway)
    assert time.time() - 600 < first[last] <= time.time()
    assert main(["schedule", "--every", "6h", "--max-runs", "1", "--input",
                 str(tmp_path / "missing.jsonl"), *common]) == 0
    after = _gateway(real_pushgateway)
    assert after[("trainer_runs_total", (("job", "trainer"), ("outcome", "failed")))] == 1
    assert after[last] == first[last], "a failed run must not erase the last success"

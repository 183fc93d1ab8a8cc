"""A real Prometheus (the Debian package) scrapes a running streamer and answers the p99
end-to-end latency through its HTTP API, the way the dashboard and the SLO alert ask for it.

This proves what promtool cannot: that the live exposition parses, that the histogram has the
shape ``histogram_quantile`` needs, and that every shipped alert rule loads into a real server
and evaluates without error against real series. Skips only where the binary is missing
(``apt-get install prometheus``, as .ci/run does).
"""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from kafka import KafkaProducer

from ..kafka_helpers import Topics
from ..streamer.service_helpers import running_service, settings_for
from .promql import RULES

JOB = "streamer-live"
P99 = (
    "histogram_quantile(0.99, sum by (le) "
    "(rate(streamer_end_to_end_latency_seconds_bucket[30s])))"
)
T = TypeVar("T")


@pytest.fixture(scope="module")
def prometheus_bin() -> str:
    path = shutil.which("prometheus") or (
        "/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None
    )
    if path is None:
        pytest.skip("prometheus binary not found: install the Debian/Ubuntu `prometheus` package")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(directory: Path, target_port: int) -> Path:
    """Scrape every second, and load the repo's rule files (by absolute glob) so a rule the
    server cannot load fails the start instead of being skipped."""
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES / "*.yml")],
        "scrape_configs": [
            {"job_name": JOB, "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}]}
        ],
    }
    path = directory / "prometheus.yml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def api(base: str, path: str, **params: str) -> Any:
    """GET a Prometheus API endpoint and return its ``data`` (the API wraps everything)."""
    url = f"{base}{path}?{urllib.parse.urlencode(params)}" if params else f"{base}{path}"
    with urllib.request.urlopen(url, timeout=5) as resp:
        body = json.loads(resp.read())
    assert body["status"] == "success", body
    return body["data"]


def poll(fetch: Callable[[], T | None], timeout_s: float, what: str) -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        value = fetch()
        if value is not None:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: nothing within {timeout_s:.0f} s")
        time.sleep(0.25)


@contextmanager
def prometheus_server(binary: str, config: Path, workdir: Path) -> Iterator[str]:
    port = free_port()
    log_path = workdir / "prometheus.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool | None:
        if proc.poll() is not None:
            raise AssertionError(
                f"prometheus exited with {proc.returncode} (bad config or rule file?):\n"
                + log_path.read_text(errors="replace")[-3000:]
            )
        try:
            with urllib.request.urlopen(f"{base}/-/ready", timeout=1) as resp:
                return True if resp.status == 200 else None
        except OSError:
            return None

    try:
        poll(ready, 20, "prometheus /-/ready")
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def feeding(topics: Topics) -> Iterator[list[int]]:
    """Produce fresh events (ts = now) every 50 ms until the block ends; yields a 1-item count."""
    stop = threading.Event()
    sent = [0]
    producer = KafkaProducer(bootstrap_servers=topics.bootstrap, linger_ms=2)

    def run() -> None:
        while not stop.is_set():
            for i in range(20):
                value = json.dumps({"ts": time.time(), "values": [i % 5, 0.5, -0.5, 1.0]})
                producer.send(topics.input, key=f"k{i}".encode(), value=value.encode())
            producer.flush()
            sent[0] += 20
            stop.wait(0.05)

    thread = threading.Thread(target=run, name="feeder", daemon=True)
    thread.start()
    try:
        yield sent
    finally:
        stop.set()
        thread.join(timeout=10)
        producer.close()


def alert_names() -> set[str]:
    return {
        rule["alert"]
        for path in RULES.glob("*.yml")
        for group in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }


def finite_scalar(base: str, query: str) -> float | None:
    result = api(base, "/api/v1/query", query=query)["result"]
    if not result:
        return None
    value = float(result[0]["value"][1])
    return value if math.isfinite(value) else None


def evaluated_rules(base: str) -> list[dict[str, Any]] | None:
    """All loaded rules once each has been evaluated at least once (health no longer unknown)."""
    rules = [r for g in api(base, "/api/v1/rules")["groups"] for r in g["rules"]]
    return rules if rules and all(r["health"] != "unknown" for r in rules) else None


def test_prometheus_scrapes_the_streamer_and_answers_p99_latency(
    prometheus_bin: str, topics: Topics, artifact_dir: Path, tmp_path: Path
) -> None:
    with running_service(settings_for(topics, artifact_dir)) as service, feeding(topics) as sent:
        config = write_config(tmp_path, service.http.port)
        with prometheus_server(prometheus_bin, config, tmp_path) as base:
            p99 = poll(lambda: finite_scalar(base, P99), 40, f"a finite value for {P99}")
            up = finite_scalar(base, f'up{{job="{JOB}"}}')
            rules = poll(lambda: evaluated_rules(base), 20, "every rule evaluated once")

    assert sent[0] > 0
    assert 0 < p99 < 5.0, f"p99 end-to-end latency {p99} s"
    assert up == 1
    loaded = {r["name"] for r in rules if r["type"] == "alerting"}
    assert loaded == alert_names(), "the server loaded the repo's alert rules"
    broken = {r["name"]: r.get("lastError") for r in rules if r["health"] != "ok"}
    assert not broken, f"rules failing to evaluate against real series: {broken}"

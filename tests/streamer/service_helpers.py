"""Run the real service on a thread against the embedded broker, and scrape it over HTTP."""

from __future__ import annotations

import re
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from streamer.service import Service
from streamer.settings import StreamerSettings

from ..kafka_helpers import Topics


def settings_for(topics: Topics, model: Path, **overrides: Any) -> StreamerSettings:
    base: dict[str, Any] = dict(
        bootstrap_servers=topics.bootstrap, input_topic=topics.input,
        output_topic=topics.output, dlq_topic=topics.dlq, group_id=f"g-{topics.input}",
        model=model, device="cpu", metrics_address="127.0.0.1:0", capacity=4096,
        max_batch_events=512, lag_interval_s=0.2, registry_poll_s=0.2,
    )
    base.update(overrides)
    return StreamerSettings(**base)


@contextmanager
def running_service(settings: StreamerSettings) -> Iterator[Service]:
    service = Service.from_settings(settings)
    stop = threading.Event()
    errors: list[BaseException] = []

    def target() -> None:
        try:
            service.run(stop)
        except BaseException as exc:  # surfaced to the test below
            errors.append(exc)

    thread = threading.Thread(target=target, name="service-under-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while service.http.port == 0 and time.monotonic() < deadline:  # bound once run() starts
        time.sleep(0.01)
    try:
        yield service
    finally:
        stop.set()
        thread.join(timeout=30)
        assert not thread.is_alive(), "service did not stop within 30 s"
    if errors:
        raise errors[0]


def scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def sample(text: str, name: str, labels: str = "") -> float:
    """Value of one exposition-format sample, e.g. sample(t, 'x_total', 'reason="a"')."""
    pattern = rf"^{re.escape(name)}(?:\{{([^}}]*)\}})? (\S+)$"
    for m in re.finditer(pattern, text, re.MULTILINE):
        if labels in (m.group(1) or ""):
            return float(m.group(2))
    raise KeyError(f"{name}{{{labels}}} not in scrape")



def run_topics(broker: Any, prefix: str) -> tuple[str, str, str]:
    """Topics ``<prefix>-<id>`` (2 partitions), its ``.out`` (2) and ``.dlq`` (1) on the
    embedded ``broker``. Returns (input topic, output topic, group id)."""
    import uuid

    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    for topic, parts in ((name, 2), (f"{name}.out", 2), (f"{name}.dlq", 1)):
        broker.create_topic(topic, partitions=parts)
    return name, f"{name}.out", f"g-{name}"


def streamer_process(bootstrap: str, topics: tuple[str, str, str], model: Path,
                     kafka_client: str, *extra: str) -> Any:
    """``streamer run`` on ``topics`` (from :func:`run_topics`) as a subprocess, stdout and
    stderr piped, with ``extra`` flags."""
    from .test_cli import _streamer

    name, out_topic, group = topics
    return _streamer(
        "run", "--bootstrap-servers", bootstrap, "--input-topic", name,
        "--output-topic", out_topic, "--group-id", group, "--model", str(model),
        "--device", "cpu", "--metrics-address", "127.0.0.1:0", "--kafka-client", kafka_client,
        *extra,
    )

"""Every metric that a dashboard panel or an alert rule names is really exported, checked
against a live /metrics scrape of the running service (not against the source code).

A name that is not exported shows "No data" in Grafana, or makes an alert that can never fire;
neither fails anywhere else. A family counts as exported when the scrape has its ``# TYPE``
line and at least one series (``<name>_bucket`` for a histogram), because Prometheus sees
series, not families: a labelled counter with no children would still show nothing.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from ..kafka_helpers import Topics, produce, read_topic
from ..streamer.service_helpers import running_service, scrape, settings_for
from .promql import ROOT, all_exprs, metric_names_in_expr

_TYPE = re.compile(r"^# TYPE (\S+) (\S+)$", re.MULTILINE)
_SERIES = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{|\s)", re.MULTILINE)


def referenced(prefix: str) -> set[str]:
    names: set[str] = set()
    for expr in all_exprs():
        names |= metric_names_in_expr(expr)
    return {n for n in names if n.startswith(prefix)}


def not_exported(names: set[str], exposition: str) -> dict[str, str]:
    """Each name the scrape fails to back, with what is missing."""
    types = dict(_TYPE.findall(exposition))
    series = set(_SERIES.findall(exposition))
    problems: dict[str, str] = {}
    for name in sorted(names):
        kind = types.get(name)
        if kind is None:
            problems[name] = "no # TYPE line"
        elif kind == "histogram" and f"{name}_bucket" not in series:
            problems[name] = "histogram without _bucket series"
        elif kind != "histogram" and name not in series:
            problems[name] = f"{kind} family without any series"
    return problems


def test_not_exported_reads_type_lines_and_series() -> None:
    text = (
        "# TYPE a_total counter\n"
        "# TYPE h histogram\nh_bucket{le=\"1.0\"} 0.0\n"
        "# TYPE g gauge\ng 1.0\n"
    )
    assert not_exported({"h", "g"}, text) == {}
    assert not_exported({"a_total", "missing"}, text) == {
        "a_total": "counter family without any series", "missing": "no # TYPE line",
    }


def test_every_streamer_metric_in_dashboards_and_rules_is_exported(
    topics: Topics, artifact_dir: Path
) -> None:
    names = referenced("streamer_")
    assert len(names) >= 10, f"the PromQL scanner found too few names: {sorted(names)}"
    now = time.time()
    good = [
        (f"k{i}".encode(), json.dumps({"ts": now, "values": [i, 1.0, 0.0, -1.0]}).encode())
        for i in range(20)
    ]
    # One bad message: streamer_dead_letter_total{reason} has no series until one is counted.
    with running_service(settings_for(topics, artifact_dir)) as service:
        produce(topics.bootstrap, topics.input, [*good, (b"k0", b"{not json")])
        assert len(read_topic(topics.bootstrap, topics.output, expect=20, settle_s=0)) == 20
        assert len(read_topic(topics.bootstrap, topics.dlq, expect=1, settle_s=0)) == 1
        deadline = time.monotonic() + 10
        while True:  # lag is sampled every lag_interval_s, after the assignment
            status, text = scrape(service.http.port)
            if not not_exported(names, text) or time.monotonic() >= deadline:
                break
            time.sleep(0.1)

    assert status == 200
    assert not not_exported(names, text), not_exported(names, text)


def test_every_trainer_metric_in_dashboards_and_rules_is_exported() -> None:
    names = referenced("trainer_")
    assert names, "the dashboard and the rules name trainer metrics"
    if not (ROOT / "trainer" / "schedule.py").exists():
        pytest.skip(
            "trainer/schedule.py (the trainer's metrics) does not exist yet; "
            f"cannot scrape {sorted(names)}"
        )
    from streamer.metrics import HealthState, MetricsServer
    from trainer.schedule import RunSummary, Scheduler, TrainerMetrics

    # Wired as `trainer schedule` wires it, with one successful run standing in for training:
    # trainer_validation_mae and the version info only get a value from a finished run.
    metrics = TrainerMetrics()
    scheduler = Scheduler(lambda: RunSummary("success", "v-live-1", 0.125), every_s=3600,
                          metrics=metrics, max_runs=1)
    with MetricsServer(metrics.registry, HealthState(), "127.0.0.1", 0) as server:
        assert scheduler.run() == 1
        status, text = scrape(server.port)

    assert status == 200
    assert not not_exported(names, text), not_exported(names, text)

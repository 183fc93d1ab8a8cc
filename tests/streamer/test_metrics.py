from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from streamer.collectors import MetricsSnapshot
from streamer.metrics import HealthState, Metrics, MetricsServer

METRIC_NAMES = [
    "streamer_end_to_end_latency_seconds",
    "streamer_processing_latency_seconds",
    "streamer_model_step_seconds",
    "streamer_batch_events",
    "streamer_model_swap_seconds",
    "streamer_rewarm_seconds",
    "streamer_events_in_total",
    "streamer_predictions_out_total",
    "streamer_dead_letter_total",
    "streamer_commits_total",
    "streamer_offsets_skipped_total",
    "streamer_key_evictions_total",
    "streamer_model_swaps_total",
    "streamer_consumer_lag_messages",
    "streamer_keys_resident",
    "streamer_model_info",
    "streamer_ready",
    "streamer_assigned_partitions",
    "streamer_consumer_lag_stale",
    "streamer_rebalance_dropped_records_total",
    "streamer_commit_failures_total",
    "streamer_kafka_retries_total",
    "streamer_model_fallbacks_total",
]


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


@pytest.fixture
def health() -> HealthState:
    return HealthState()


@pytest.fixture
def server(metrics: Metrics, health: HealthState) -> Iterator[MetricsServer]:
    with MetricsServer(metrics.registry, health, "127.0.0.1", 0, heartbeat_timeout_s=0.2) as srv:
        yield srv


def get(server: MetricsServer, path: str) -> tuple[int, str, str]:
    """(status, content type, body); 4xx/5xx are answers here, not exceptions."""
    url = f"http://127.0.0.1:{server.port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def series(body: str, name: str) -> list[str]:
    return [line for line in body.splitlines() if line.startswith(name + "{")]


def test_metrics_endpoint_exposes_every_metric(server: MetricsServer) -> None:
    assert server.port != 0
    status, ctype, body = get(server, "/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    for name in METRIC_NAMES:
        assert f"# TYPE {name} " in body, name


def test_observe_latencies_counts_every_value(metrics: Metrics, server: MetricsServer) -> None:
    latencies = np.array([0.0002, 0.0003, 0.004, 1.5, 40.0, np.nan], dtype=np.float32)
    metrics.observe_latencies(latencies, processing_seconds=0.003, n_predictions=5)
    metrics.observe_latencies([0.00005], processing_seconds=0.001, n_predictions=1)
    body = get(server, "/metrics")[2]
    assert "streamer_end_to_end_latency_seconds_count 6.0" in body  # NaN dropped
    assert "streamer_processing_latency_seconds_count 2.0" in body
    assert "streamer_predictions_out_total 6.0" in body
    reg = metrics.registry
    bucket = "streamer_end_to_end_latency_seconds_bucket"
    assert reg.get_sample_value(bucket, {"le": "0.0001"}) == 1
    assert reg.get_sample_value(bucket, {"le": "0.00025"}) == 2
    assert reg.get_sample_value(bucket, {"le": "30.0"}) == 5
    assert reg.get_sample_value(bucket, {"le": "+Inf"}) == 6


def test_snapshot_totals(metrics: Metrics) -> None:
    metrics.dead_lettered("bad_json", 2)
    metrics.dead_lettered("too_far_ahead")
    metrics.swap("success")
    metrics.swap("refused")
    metrics.swap("refused")
    snap = MetricsSnapshot(metrics.registry)
    assert snap.total("streamer_dead_letter_total") == 3
    assert snap.total("streamer_dead_letter_total", reason="bad_json") == 2
    assert snap.total("streamer_model_swaps_total", outcome="refused") == 2
    assert snap.total("streamer_events_in_total") == 0


def test_batch_and_counters(metrics: Metrics) -> None:
    reg = metrics.registry
    metrics.observe_batch(3, 0.0004)
    metrics.observe_batch(5000, 0.02)
    assert reg.get_sample_value("streamer_events_in_total") == 5003
    assert reg.get_sample_value("streamer_batch_events_bucket", {"le": "4.0"}) == 1
    assert reg.get_sample_value("streamer_batch_events_bucket", {"le": "4096.0"}) == 1
    assert reg.get_sample_value("streamer_batch_events_bucket", {"le": "8192.0"}) == 2
    assert reg.get_sample_value("streamer_model_step_seconds_bucket", {"le": "0.0005"}) == 1
    metrics.dead_lettered("bad_json")
    metrics.dead_lettered("bad_json", 2)
    metrics.committed()
    metrics.offsets_skipped("events", 2, 40)
    metrics.offsets_skipped("events", 2, 2)
    metrics.evicted("ttl", 7)
    assert reg.get_sample_value("streamer_dead_letter_total", {"reason": "bad_json"}) == 3
    assert reg.get_sample_value("streamer_commits_total") == 1
    skipped = {"topic": "events", "partition": "2"}
    assert reg.get_sample_value("streamer_offsets_skipped_total", skipped) == 42
    assert reg.get_sample_value("streamer_key_evictions_total", {"reason": "ttl"}) == 7
    assert reg.get_sample_value("streamer_key_evictions_total", {"reason": "capacity"}) == 0


def test_swap_and_gauges(metrics: Metrics) -> None:
    reg = metrics.registry
    metrics.swap("success", seconds=0.8, rewarm_seconds=0.5)
    metrics.swap("refused")
    assert reg.get_sample_value("streamer_model_swaps_total", {"outcome": "success"}) == 1
    assert reg.get_sample_value("streamer_model_swaps_total", {"outcome": "refused"}) == 1
    assert reg.get_sample_value("streamer_model_swap_seconds_count") == 1
    assert reg.get_sample_value("streamer_rewarm_seconds_sum") == 0.5
    metrics.set_keys_resident(12)
    metrics.set_assigned_partitions(4)
    metrics.set_ready(True)
    assert reg.get_sample_value("streamer_keys_resident") == 12
    assert reg.get_sample_value("streamer_assigned_partitions") == 4
    assert reg.get_sample_value("streamer_ready") == 1
    metrics.set_ready(False)
    assert reg.get_sample_value("streamer_ready") == 0


def test_model_version_keeps_one_series(metrics: Metrics, server: MetricsServer) -> None:
    metrics.set_model_version("v1")
    metrics.set_model_version("v2")
    metrics.set_model_version("v2")
    assert series(get(server, "/metrics")[2], "streamer_model_info") == [
        'streamer_model_info{version="v2"} 1.0'
    ]


def test_set_lag_removes_gone_partitions(metrics: Metrics, server: MetricsServer) -> None:
    metrics.set_lag({("events", 0): 5, ("events", 1): 7})
    assert len(series(get(server, "/metrics")[2], "streamer_consumer_lag_messages")) == 2
    metrics.set_lag({("events", 1): 3})
    reg = metrics.registry
    lag = "streamer_consumer_lag_messages"
    assert reg.get_sample_value(lag, {"topic": "events", "partition": "0"}) is None
    assert reg.get_sample_value(lag, {"topic": "events", "partition": "1"}) == 3
    assert series(get(server, "/metrics")[2], lag) == [
        'streamer_consumer_lag_messages{partition="1",topic="events"} 3.0'
    ]


def test_healthz_follows_heartbeat(health: HealthState, server: MetricsServer) -> None:
    health.beat()
    assert get(server, "/healthz")[::2] == (200, "ok\n")
    time.sleep(0.3)  # past the 0.2 s heartbeat timeout
    assert health.healthy(0.2) is False
    status, _, body = get(server, "/healthz")
    assert status == 503 and "heartbeat" in body
    health.beat()
    assert get(server, "/healthz")[0] == 200


def test_readyz_follows_ready_flag(health: HealthState, server: MetricsServer) -> None:
    status, _, body = get(server, "/readyz")
    assert status == 503 and "starting" in body
    health.set_ready(True)
    assert get(server, "/readyz")[0] == 200 and health.ready()
    health.set_ready(False, "partitions revoked")
    status, _, body = get(server, "/readyz")
    assert status == 503 and "partitions revoked" in body


def test_unknown_path_is_404(server: MetricsServer) -> None:
    assert get(server, "/nope")[0] == 404


def test_stop_releases_port(metrics: Metrics, health: HealthState) -> None:
    srv = MetricsServer(metrics.registry, health, "127.0.0.1", 0).start()
    port = srv.port
    assert get(srv, "/healthz")[0] == 200
    srv.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)
    srv.stop()  # idempotent


def test_default_registry_is_private() -> None:
    a, b = Metrics(), Metrics()  # would raise "Duplicated timeseries" on a shared registry
    a.committed()
    assert a.registry is not b.registry
    assert b.registry.get_sample_value("streamer_commits_total") == 0


def test_keep_lag_removes_partitions_no_longer_kept(
    metrics: Metrics, server: MetricsServer
) -> None:
    metrics.set_lag({("events", 0): 5.0, ("events", 1): 3.0})
    metrics.keep_lag(lambda _topic, partition: partition == 1)
    metrics.set_lag_stale(True)
    text = get(server, "/metrics")[2]
    assert len(series(text, "streamer_consumer_lag_messages")) == 1
    assert 'streamer_consumer_lag_messages{partition="1",topic="events"} 3.0' in text
    assert "streamer_consumer_lag_stale 1.0" in text

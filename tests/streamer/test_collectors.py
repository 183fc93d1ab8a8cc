"""The batched histogram and the snapshot reader, each against a plain reference."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram

from streamer.collectors import BatchHistogram, MetricsSnapshot
from streamer.metrics import LATENCY_BUCKETS


def test_batch_histogram_equals_histogram_observe_loop() -> None:
    """The batched collector must expose what prometheus_client's own Histogram would."""
    rng = np.random.default_rng(0)
    values = np.concatenate(
        [rng.exponential(0.01, 5000), np.array(LATENCY_BUCKETS), [-1.0, 0.0, 1e6]]
    )
    fast_reg, slow_reg = CollectorRegistry(), CollectorRegistry()
    fast = BatchHistogram("h_seconds", "h", buckets=LATENCY_BUCKETS, registry=fast_reg)
    slow = Histogram("h_seconds", "h", buckets=LATENCY_BUCKETS, registry=slow_reg)
    fast.observe_many(values[:3000])
    fast.observe_many(values[3000:].reshape(-1, 1))
    fast.observe(0.003)
    for value in [*values.tolist(), 0.003]:
        slow.observe(value)
    for le in [*map(str, LATENCY_BUCKETS), "+Inf"]:
        labels = {"le": le}
        assert fast_reg.get_sample_value("h_seconds_bucket", labels) == (
            slow_reg.get_sample_value("h_seconds_bucket", labels)
        ), le
    for suffix in ("_count", "_sum"):
        assert fast_reg.get_sample_value("h_seconds" + suffix) == pytest.approx(
            slow_reg.get_sample_value("h_seconds" + suffix)
        )
    with pytest.raises(ValueError, match="Duplicated"):
        BatchHistogram("h_seconds", "again", buckets=LATENCY_BUCKETS, registry=fast_reg)


def test_snapshot_quantile_is_histogram_quantile() -> None:
    reg = CollectorRegistry()
    hist = BatchHistogram("h_seconds", "h", buckets=LATENCY_BUCKETS, registry=reg)
    assert MetricsSnapshot(reg).quantile(0.5, "h_seconds") is None
    hist.observe_many(np.linspace(0.0011, 0.0025, 1000))  # all in the (0.001, 0.0025] bucket
    first = MetricsSnapshot(reg)
    # Linear within the bucket, as PromQL's histogram_quantile.
    assert first.quantile(0.5, "h_seconds") == pytest.approx(0.00175)
    assert first.quantile(1.0, "h_seconds") == pytest.approx(0.0025)
    hist.observe_many(np.full(1000, 0.7))  # (0.5, 1.0]
    second = MetricsSnapshot(reg)
    assert second.quantile(0.5, "h_seconds", since=first) == pytest.approx(0.75)
    assert second.quantile(0.5, "h_seconds") == pytest.approx(0.0025)  # whole history
    assert second.quantile(0.5, "h_seconds", since=second) is None  # nothing new
    hist.observe_many(np.full(10, 99.0))  # past the last finite bound: its bound is reported
    assert MetricsSnapshot(reg).quantile(1.0, "h_seconds", since=second) == 30.0
    # Within one bucket's width of the exact quantile for a realistic spread.
    values = np.random.default_rng(1).exponential(0.01, 20_000)
    reg = CollectorRegistry()
    BatchHistogram("e_seconds", "e", buckets=LATENCY_BUCKETS, registry=reg).observe_many(values)
    for q in (0.5, 0.9, 0.99):
        got, exact = MetricsSnapshot(reg).quantile(q, "e_seconds"), float(np.quantile(values, q))
        i = int(np.searchsorted(LATENCY_BUCKETS, exact))
        assert got is not None and LATENCY_BUCKETS[i - 1] <= got <= LATENCY_BUCKETS[i], q

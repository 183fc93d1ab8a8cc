"""The PromQL metric-name scanner used to check dashboards and alerts against /metrics."""

from __future__ import annotations

import pytest

from .promql import all_exprs, base_name, metric_names_in_expr

CASES = [
    ("streamer_ready == 0", {"streamer_ready"}),
    ("absent(streamer_ready)", {"streamer_ready"}),
    (
        "histogram_quantile(0.99, sum by (le) "
        "(rate(streamer_end_to_end_latency_seconds_bucket[$__rate_interval])))",
        {"streamer_end_to_end_latency_seconds"},
    ),
    (
        "sum(rate(streamer_dead_letter_total[5m])) "
        "/ clamp_min(sum(rate(streamer_events_in_total[5m])), 1e-9) > 0.01",
        {"streamer_dead_letter_total", "streamer_events_in_total"},
    ),
    (
        "sum(streamer_consumer_lag_messages) > 10000 and "
        "deriv(sum(streamer_consumer_lag_messages)[10m:1m]) > 0",
        {"streamer_consumer_lag_messages"},
    ),
    # Label names, label values and grouping labels are not metrics.
    (
        'sum by (topic, partition) (streamer_consumer_lag_messages{topic="events", '
        'partition=~"1|2", instance=~"$instance"})',
        {"streamer_consumer_lag_messages"},
    ),
    (
        "rate(streamer_model_swap_seconds_sum[1h]) / rate(streamer_model_swap_seconds_count[1h])",
        {"streamer_model_swap_seconds"},
    ),
    ("time() - trainer_last_success_timestamp_seconds > 3 * 6 * 3600",
     {"trainer_last_success_timestamp_seconds"}),
    (
        "a_total * on (instance) group_left (version) b_info offset 5m unless bool c",
        {"a_total", "b_info", "c"},
    ),
    ('{__name__="streamer_batch_events_bucket", le="+Inf"}', {"streamer_batch_events"}),
    ("topk(3, sum without (le) (x:recorded:rate5m)) or vector(0)", {"x:recorded:rate5m"}),
    ("1 + 2 * 3e-4 - 0x1F", set()),
]


@pytest.mark.parametrize(("expr", "expected"), CASES, ids=[c[0][:40] for c in CASES])
def test_metric_names_in_expr(expr: str, expected: set[str]) -> None:
    assert metric_names_in_expr(expr) == expected


def test_base_name_strips_only_histogram_suffixes() -> None:
    assert base_name("streamer_model_step_seconds_bucket") == "streamer_model_step_seconds"
    assert base_name("streamer_commits_total") == "streamer_commits_total"
    assert base_name("_count") == "_count"


def test_all_exprs_reads_dashboard_and_rules() -> None:
    exprs = all_exprs()
    # An alert-only expression and a dashboard-only one (Grafana variable left in place).
    assert "absent(streamer_ready)" in exprs
    assert any("streamer_model_swap_seconds_bucket" in e for e in exprs)
    assert any("$__rate_interval" in e for e in exprs)
    assert all(isinstance(e, str) and e.strip() for e in exprs)

"""promtool over the shipped Prometheus config, alert rules, rule unit tests and dashboard queries.

promtool is the reference PromQL parser and rule evaluator, so these tests run it for real;
they skip only when it is not installed (`apt-get install prometheus`, as .ci/run does).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from .promql import DASHBOARDS, ROOT, dashboard_exprs

PROM = ROOT / "deploy" / "prometheus"
RULE_FILES = sorted((PROM / "rules").glob("*.yml"))
TEST_FILES = sorted((PROM / "tests").glob("*.yml"))


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not on PATH: install the Debian/Ubuntu `prometheus` package")
    return path


def run(*args: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def test_rule_and_test_files_exist() -> None:
    assert [p.name for p in RULE_FILES] == ["streamer.rules.yml"]
    assert TEST_FILES, "no promtool unit tests under deploy/prometheus/tests"


def test_check_rules(promtool: str) -> None:
    result = run(promtool, "check", "rules", *RULE_FILES)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_check_config(promtool: str) -> None:
    result = run(promtool, "check", "config", PROM / "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    # rule_files is relative to the config: it must find the rules, not match nothing.
    assert "SUCCESS: 1 rule files found" in result.stdout


def test_rule_unit_tests(promtool: str) -> None:
    result = run(promtool, "test", "rules", *TEST_FILES)
    assert result.returncode == 0, result.stdout + result.stderr


def _alert_names() -> set[str]:
    doc = yaml.safe_load(RULE_FILES[0].read_text(encoding="utf-8"))
    return {r["alert"] for g in doc["groups"] for r in g["rules"] if "alert" in r}


def test_unit_tests_cover_every_alert_firing_and_silent() -> None:
    fires: set[str] = set()
    silent: set[str] = set()
    for path in TEST_FILES:
        for case in yaml.safe_load(path.read_text(encoding="utf-8"))["tests"]:
            for check in case.get("alert_rule_test", []):
                (fires if check.get("exp_alerts") else silent).add(check["alertname"])
    names = _alert_names()
    assert names == {
        "StreamerP99LatencyHigh",
        "StreamerConsumerLagGrowing",
        "StreamerDeadLetterRate",
        "TrainerNoRecentSuccess",
        "StreamerNotReady",
    }
    assert names <= fires, f"alerts never shown firing: {sorted(names - fires)}"
    assert names <= silent, f"alerts never shown silent: {sorted(names - silent)}"


# Each mutation weakens one alert; the unit tests must notice, or they pin nothing.
MUTATIONS = [
    ("> 0.25", "> 0.6"),
    ("> 10000", "> 20000"),
    ("> 0.01", "> 0.05"),
    ("3 * 6 * 3600", "4 * 6 * 3600"),
    ("or absent(trainer_last_success_timestamp_seconds)",
     "or absent(trainer_last_success_timestamp_seconds) * 0 > 1"),
    ("streamer_ready == 0", "streamer_ready < 0"),
    ("expr: absent(streamer_ready)", "expr: absent(streamer_ready) * 0 > 1"),
]


@pytest.mark.parametrize(("old", "new"), MUTATIONS, ids=[m[1] for m in MUTATIONS])
def test_unit_tests_catch_a_weakened_alert(
    promtool: str, tmp_path: Path, old: str, new: str
) -> None:
    source = RULE_FILES[0].read_text(encoding="utf-8")
    assert source.count(old) == 1, f"mutation target {old!r} not unique in the rules"
    (tmp_path / "rules").mkdir()
    (tmp_path / "tests").mkdir()
    (tmp_path / "rules" / RULE_FILES[0].name).write_text(source.replace(old, new))
    for path in TEST_FILES:
        shutil.copy(path, tmp_path / "tests" / path.name)
    result = run(promtool, "test", "rules", *sorted((tmp_path / "tests").glob("*.yml")))
    assert result.returncode != 0, f"unit tests still pass with {old!r} -> {new!r}"


def test_dashboard_queries_parse(promtool: str, tmp_path: Path) -> None:
    """Every dashboard query, with Grafana's interval variables filled in, is valid PromQL."""
    exprs = [e for path in sorted(DASHBOARDS.glob("*.json")) for e in dashboard_exprs(path)]
    assert exprs
    rules = [
        {"record": f"dashboard:query_{i}:check", "expr": e.replace("$__rate_interval", "1m")}
        for i, e in enumerate(exprs)
    ]
    rule_file = tmp_path / "dashboard.rules.yml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run(promtool, "check", "rules", rule_file)
    assert result.returncode == 0, result.stdout + result.stderr

"""Just enough PromQL reading to list the metrics that dashboards and alerts depend on.

A dashboard panel or an alert that names a metric the process does not export shows "No data"
or never fires, silently. Comparing `metric_names_in_expr` over `all_exprs()` with a live
/metrics scrape catches that. This is a scanner, not a parser: it strips everything that can
hold identifiers which are not metric names (strings, label matchers, ranges, grouping
clauses, Grafana variables), then drops function names and keywords.

    >>> sorted(metric_names_in_expr('sum by (le) (rate(streamer_model_step_seconds_bucket[5m]))'))
    ['streamer_model_step_seconds']
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = ROOT / "deploy" / "grafana" / "dashboards"
RULES = ROOT / "deploy" / "prometheus" / "rules"

AGGREGATIONS = frozenset(
    "sum min max avg group stddev stdvar count count_values bottomk topk quantile limitk "
    "limit_ratio".split()
)
KEYWORDS = frozenset(
    "by without on ignoring group_left group_right bool offset and or unless atan2 inf nan".split()
)
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_GRAFANA_VAR = re.compile(r"\$\{[^}]*\}|\$\w+|\[\[\w+\]\]")
_NAME_MATCHER = re.compile(r'__name__\s*=\s*"([^"]*)"')
_BRACES = re.compile(r"\{[^{}]*\}")
_BRACKETS = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
# Numbers first (1e-9, 0x1F, 5m, 1h30m) so their letters are never read as identifiers.
_TOKEN = re.compile(
    r"(?P<num>0x[0-9a-fA-F]+|(?:\d+(?:ms|[smhdwy]))+|\d*\.?\d+(?:[eE][+-]?\d+)?)"
    r"|(?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)(?P<call>\s*\()?"
)


def base_name(name: str) -> str:
    """Map a histogram's series name (x_bucket, x_sum, x_count) to the metric name x."""
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def metric_names_in_expr(expr: str) -> set[str]:
    """Metric names referenced by a PromQL expression, histogram suffixes stripped."""
    names: set[str] = set()
    # Only the raw text still has a {__name__="x"} matcher's value in quotes.
    names.update(base_name(m) for m in _NAME_MATCHER.findall(expr) if m)
    text = _GRAFANA_VAR.sub(" ", expr)
    text = _STRING.sub('""', text)
    text = _BRACES.sub(" ", text)
    # Subqueries nest one level: [10m:1m] inside (...)[...]; strip until nothing is left.
    while _BRACKETS.search(text):
        text = _BRACKETS.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    for match in _TOKEN.finditer(text):
        ident = match.group("ident")
        if ident is None or match.group("call"):
            continue  # a number, or a function / aggregation call
        if ident.lower() in KEYWORDS or ident in AGGREGATIONS:
            continue
        names.add(base_name(ident))
    return names


def dashboard_exprs(path: Path) -> list[str]:
    """Every target expr of a Grafana dashboard JSON, including panels nested in rows."""
    exprs: list[str] = []
    stack = list(json.loads(path.read_text(encoding="utf-8")).get("panels", []))
    while stack:
        panel = stack.pop(0)
        stack.extend(panel.get("panels", []))
        exprs.extend(t["expr"] for t in panel.get("targets", []) if t.get("expr"))
    return exprs


def rule_exprs(path: Path) -> list[str]:
    """Every alerting and recording rule expr of a Prometheus rules file."""
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    return [rule["expr"] for group in doc["groups"] for rule in group["rules"]]


def all_exprs() -> list[str]:
    """Every PromQL expression in the shipped dashboards and rule files."""
    exprs: list[str] = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        exprs.extend(dashboard_exprs(path))
    for path in sorted(RULES.glob("*.yml")):
        exprs.extend(rule_exprs(path))
    return exprs

"""The ops files of the repository (compose, Prometheus, Grafana) as the tests of tests/docker read them."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
COMPOSE = REPO / "docker-compose.yml"
PROMETHEUS_DIR = DOCKER / "prometheus"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
ALERTS_TEST = PROMETHEUS_DIR / "alerts_test.yml"
GRAFANA = DOCKER / "grafana"
DASHBOARDS = GRAFANA / "dashboards"
ALLOWLIST = DOCKER / "allowlist.yml"
WORKER_MODULE = "service.jobs.worker"  # what the workers service runs (issue 17 provides it)

# Grafana's own variables, replaced by what Grafana would put there, so that Prometheus can run the query.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}
# Series that Prometheus makes itself rather than scrapes.
PROMETHEUS_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
PROMQL_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "group_left", "group_right"}
LABEL_LISTS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE)


def allowlist() -> dict[str, dict[str, list[str]]]:
    return load_yaml(ALLOWLIST)


def dashboards() -> dict[str, dict[str, Any]]:
    return {path.name: json.loads(path.read_text()) for path in sorted(DASHBOARDS.glob("*.json"))}


def dashboard_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel that is not a row, those inside collapsed rows too."""
    panels = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            panels += panel.get("panels", [])
        else:
            panels.append(panel)
    return panels


def dashboard_queries() -> list[str]:
    """Every PromQL query of the dashboards, Grafana's variables replaced."""
    queries = []
    for dashboard in dashboards().values():
        for panel in dashboard_panels(dashboard):
            for target in panel["targets"]:
                expr = target["expr"]
                for variable, value in GRAFANA_VARIABLES.items():
                    expr = expr.replace(variable, value)
                queries.append(expr)
    return queries


def rule_expressions() -> dict[str, str]:
    """Alert (or record) name → expression, from the alert rules file."""
    return {
        rule.get("alert") or rule["record"]: rule["expr"]
        for group in load_yaml(ALERTS)["groups"]
        for rule in group["rules"]
    }


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not its functions, keywords or label names).

    Good enough for the queries of this repository: strings, label matchers, ranges and label lists
    are cut out; then every identifier not followed by "(" is a metric name.
    """
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)
    expr = LABEL_LISTS.sub(" ", expr)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[a-zA-Z_:][\w:]*", expr):
        if expr[match.end() :].lstrip().startswith("(") or match.group() in PROMQL_KEYWORDS:
            continue
        names.add(match.group())
    return names


def used_metric_names() -> set[str]:
    """Every metric name the dashboards and the alert rules use."""
    exprs = dashboard_queries() + list(rule_expressions().values())
    return set().union(*(metric_names(e) for e in exprs))

"""The Grafana dashboard and the alert rules name only metrics the service declares (or the allow-list's).

The live check, against a running API scraped by a real Prometheus, is in tests/service/test_ops_stack.py; this one
runs in the fast suite, against the metrics the service's modules declare.
"""

from __future__ import annotations

from ops_files import (
    GRAFANA,
    PROMETHEUS_SERIES,
    allowlist,
    dashboard_panels,
    dashboards,
    load_yaml,
    metric_names,
    used_metric_names,
)
from prometheus_client import REGISTRY

import service.http.app  # noqa: F401  (declares every metric of the API)

SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_count", "_sum"),
    "gauge": ("",),
    "summary": ("_count", "_sum", ""),
}


def declared_sample_names() -> set[str]:
    """Sample names the API's metrics export once they have a child, from the default registry's families."""
    names = set()
    for family in REGISTRY.collect():
        names |= {family.name + suffix for suffix in SUFFIXES.get(family.type, ("",))}
    return names


def test_metric_name_extraction() -> None:
    expr = 'sum by (le) (rate(a_bucket{x="y(", le!="1"}[5m])) / on () group_left b offset 1h > 0.5 unless c'
    assert metric_names(expr) == {"a_bucket", "b", "c"}
    assert metric_names("histogram_quantile(0.99, sum without (instance) (rate(x[$__rate_interval])))") == {"x"}


def test_every_name_is_declared_by_the_service_or_allowed() -> None:
    listed = allowlist()["metrics"]
    allowed = set(listed["workers"]) | set(listed["cuda"]) | PROMETHEUS_SERIES
    unknown = used_metric_names() - declared_sample_names() - allowed
    assert not unknown, f"the dashboard or the alert rules use metrics nobody exports: {sorted(unknown)}"
    # The allow-list holds only what is really used.
    assert set(listed["workers"]) | set(listed["cuda"]) <= used_metric_names()


def test_dashboard_panels_use_the_provisioned_data_source() -> None:
    sources = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    uids = {s["uid"] for s in sources if s["type"] == "prometheus"}
    for name, dashboard in dashboards().items():
        panels = dashboard_panels(dashboard)
        assert len({p["id"] for p in panels}) == len(panels), f"{name}: panel ids repeat"
        for panel in panels:
            assert panel["targets"], f"{name}: panel {panel['title']!r} has no query"
            assert panel["datasource"]["uid"] in uids, panel["title"]
            assert all(t["datasource"]["uid"] in uids for t in panel["targets"]), panel["title"]


def test_dashboard_shows_what_ops_watch() -> None:
    (dashboard,) = dashboards().values()
    text = " ".join(p["title"].lower() for p in dashboard_panels(dashboard))
    for needle in (
        "latency",
        "errors/s by cause",
        "samples/s per executor",
        "measured limit",
        "samples per forward pass",
        "backlog seconds",
        "abstention rate",
        "certified radius",
        "cache hit ratio",
        "jobs by state",
        "job throughput",
        "workers up",
        "gpu memory",
        "busy fraction",
    ):
        assert needle in text, needle

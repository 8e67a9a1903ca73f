"""The Grafana dashboard and the Prometheus alert rules in k8s/base/monitoring/ are well formed and
name only metrics that exist.

Every PromQL expression is parsed (promql-parser, the Rust parser of GreptimeDB, as a Python
package) and the metric names it selects are compared with what the services define: the list
comes from importing the services' metrics modules and reading prometheus_client's default
registry, not from a list kept by hand. Names of the inference service are checked against its own
metrics module, and reported as skipped (naming them) while it does not define them yet. Envoy's
names are checked against a running Envoy in tests/integration/test_observability_tracing.py.
"""

from __future__ import annotations

import importlib
import json
import pathlib
import re
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from prometheus_client.registry import REGISTRY

promql_parser = pytest.importorskip(
    "promql_parser",
    reason="promql-parser (a dev dependency) parses the dashboard's and the alerts' PromQL",
)

MONITORING = pathlib.Path(__file__).resolve().parents[2] / "k8s" / "base" / "monitoring"
DASHBOARD = MONITORING / "grafana-dashboard.json"
ALERTS = MONITORING / "alerts.yaml"
SCRAPE = MONITORING / "prometheus-scrape.yaml"
SERVICE_METRICS = (
    "services.common.metrics",
    "services.ingest.metrics",
    "services.aggregator.metrics",
    "services.indicators.metrics",
)
INFERENCE_METRICS = "services.inference.metrics"
# Series Prometheus makes itself for every target.
PROMETHEUS_SERIES = frozenset({"up"})
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
    "untyped": ("",),
}
# Grafana's interval variables stand where PromQL wants a duration.
GRAFANA_DURATIONS = re.compile(r"\$__(rate_interval|interval|range)\b|\$\{__(rate_interval|interval|range)\}")
SEVERITIES = frozenset({"critical", "warning", "info"})
# What the issue asks the alerts to cover, by the name of the rule that does.
REQUIRED_ALERTS = {
    "service down": "MeshServiceDown",
    "ingest stalled": "IngestStalled",
    "a symbol's data stale": "SymbolDataStale",
    "a stage lagging": "StageLagging",
    "error rate": "MeshErrorRateHigh",
    "model not ready": "ModelNotReady",
}


def exported_names(*modules: str) -> set[str]:
    """Every sample name the default registry can expose once these modules are imported."""
    for module in modules:
        importlib.import_module(module)
    names = set()
    for family in REGISTRY.collect():
        names |= {family.name + suffix for suffix in SUFFIXES.get(family.type, ("",))}
    return names


def selected_names(expr: str) -> set[str]:
    """The metric names an expression selects (after Grafana's variables become PromQL)."""
    names: set[str] = set()

    def visit(node: Any) -> bool:
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            names.add(node.name)
        return True

    promql_parser.walk(parse(expr), visit)
    return names


def parse(expr: str) -> Any:
    """Parse PromQL; Grafana's interval variables are replaced by a duration first."""
    return promql_parser.parse(GRAFANA_DURATIONS.sub("5m", expr))


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return loaded


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_expressions() -> list[str]:
    board = dashboard()
    exprs = [t["expr"] for p in panels(board) for t in p.get("targets", [])]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            # label_values(<selector>, <label>): the selector is PromQL.
            match = re.fullmatch(r"label_values\((.*),\s*\w+\)", variable["definition"])
            assert match, variable["definition"]
            exprs.append(match.group(1))
    return exprs


def alert_rules() -> list[dict[str, Any]]:
    loaded = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in loaded["groups"] for rule in group["rules"]]


def all_expressions() -> list[str]:
    return dashboard_expressions() + [rule["expr"] for rule in alert_rules()]


def referenced() -> set[str]:
    return {name for expr in all_expressions() for name in selected_names(expr)}


# --- the dashboard ---------------------------------------------------------------------------------


def test_dashboard_json_has_unique_panels_inside_grid_with_queries() -> None:
    board = dashboard()
    assert board["uid"] == "mt5-mesh-pipeline"
    assert board["title"]
    every = list(panels(board))
    ids = [p["id"] for p in every]
    assert len(ids) == len(set(ids))
    for panel in every:
        grid = panel["gridPos"]
        assert grid["x"] >= 0, panel["title"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert panel["description"], panel["title"]
            refs = [t["refId"] for t in panel["targets"]]
            assert len(refs) == len(set(refs)), panel["title"]
    assert {v["name"] for v in board["templating"]["list"]} == {"datasource", "namespace", "symbol"}


@pytest.mark.parametrize("expr", dashboard_expressions())
def test_dashboard_expression_parses_as_promql(expr: str) -> None:
    assert parse(expr) is not None


def test_dashboard_covers_rate_freshness_lag_latency_and_errors() -> None:
    titles = " / ".join(p["title"] for p in panels(dashboard()) if p["type"] == "row")
    for part in ("Ingest", "Freshness", "lag", "Latency", "Errors"):
        assert part in titles
    names = {n for e in dashboard_expressions() for n in selected_names(e)}
    assert {
        "mt5_ingest_items_total",
        "mt5_data_age_seconds",
        "mt5_feed_lag_seconds",
        "mt5_grpc_server_handling_seconds_bucket",
        "mt5_grpc_server_handled_total",
    } <= names


# --- the alert rules -------------------------------------------------------------------------------


def test_alert_rules_well_formed_with_severity_and_text() -> None:
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        assert rule["annotations"]["description"], rule["alert"]
        if "for" in rule:
            assert promql_parser.parse_duration(rule["for"]).total_seconds() > 0


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_alert_rule_expression_parses_as_promql(rule: dict[str, Any]) -> None:
    assert parse(rule["expr"]) is not None


@pytest.mark.parametrize(("case", "alert"), REQUIRED_ALERTS.items())
def test_alert_rules_cover_issue_case(case: str, alert: str) -> None:
    assert alert in {rule["alert"] for rule in alert_rules()}, case


def test_alert_and_dashboard_selectors_use_scrape_job() -> None:
    # The labels the expressions filter on come from the scrape job of prometheus-scrape.yaml.
    scrape = yaml.safe_load(SCRAPE.read_text(encoding="utf-8"))["scrape_configs"]
    (job,) = [c for c in scrape if c["job_name"] == "mt5-mesh"]
    targets = {c.get("target_label") for c in job["relabel_configs"]}
    assert {"service", "namespace", "pod"} <= targets
    for expr in all_expressions():
        assert 'job="mt5-mesh"' in expr or "mt5_inference_model_info" in expr, expr


# --- metric names -----------------------------------------------------------------------------------


def test_referenced_names_are_mesh_envoy_or_prometheus_series() -> None:
    odd = {n for n in referenced() if not n.startswith(("mt5_", "envoy_")) and n not in PROMETHEUS_SERIES}
    assert odd == set()


def test_referenced_mesh_metric_names_are_defined_by_the_services() -> None:
    wanted = {n for n in referenced() if n.startswith("mt5_") and not n.startswith("mt5_inference_")}
    missing = wanted - exported_names(*SERVICE_METRICS)
    assert missing == set(), f"the dashboard or the alerts name metrics no service defines: {missing}"


def test_referenced_inference_metric_names_are_defined_by_inference() -> None:
    wanted = {n for n in referenced() if n.startswith("mt5_inference_")}
    assert wanted, "the dashboard and the alerts watch the model and its batches"
    try:
        defined = exported_names(INFERENCE_METRICS)
    except ImportError as exc:
        pytest.skip(f"expected from the inference service, which has no metrics module yet ({exc}): {wanted}")
    missing = wanted - defined
    if missing:
        pytest.skip(f"expected from the inference service, not defined yet: {sorted(missing)}")
    assert wanted <= defined


def test_exported_names_helper_sees_labelled_histograms_without_samples() -> None:
    # A labelled histogram exposes nothing before its first observation; the check must still know it.
    names = exported_names("services.common.metrics")
    assert {"mt5_db_query_seconds_bucket", "mt5_feed_lag_seconds", "mt5_data_age_seconds"} <= names


# --- wiring ------------------------------------------------------------------------------------------


def test_base_kustomization_generates_monitoring_config_maps() -> None:
    kustomization = yaml.safe_load((MONITORING.parent / "kustomization.yaml").read_text(encoding="utf-8"))
    generated = {g["name"]: g for g in kustomization["configMapGenerator"]}
    assert generated["mt5mesh-grafana-dashboard"]["files"] == ["monitoring/grafana-dashboard.json"]
    assert generated["mt5mesh-grafana-dashboard"]["options"]["labels"] == {"grafana_dashboard": "1"}
    assert set(generated["mt5mesh-prometheus"]["files"]) == {
        "monitoring/alerts.yaml",
        "monitoring/prometheus-scrape.yaml",
    }
    assert {p.name for p in MONITORING.iterdir()} == {
        "grafana-dashboard.json",
        "alerts.yaml",
        "prometheus-scrape.yaml",
    }

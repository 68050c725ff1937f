"""The chart's Grafana dashboard: valid against the dashboard JSON model, and every query
names metrics the operator really exports (``kube.metrics`` and ``kube.provider_metrics``).

The schema below is the part of Grafana's dashboard JSON model (schemaVersion 39, the
"JSON model" page of Grafana's documentation) that an import and the sidecar rely on.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from prometheus_client import generate_latest

from analysisq.kube.metrics import Metrics
from analysisq.kube.ref import RunRef
from analysisq.queue.dashboard import TargetCalls

pytestmark = pytest.mark.unit

CHART = Path(__file__).resolve().parents[2] / "charts" / "analysisq"
BOARD = CHART / "files" / "grafana-dashboard.json"

_DATASOURCE = {
    "type": "object",
    "required": ["type", "uid"],
    "properties": {"type": {"const": "prometheus"}, "uid": {"type": "string"}},
}
SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["uid", "title", "schemaVersion", "panels", "templating", "time"],
    "properties": {
        "uid": {"type": "string", "pattern": "^[a-zA-Z0-9_-]{1,40}$"},
        "title": {"type": "string", "minLength": 1},
        "schemaVersion": {"type": "integer", "minimum": 36},
        "version": {"type": "integer"},
        "editable": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "timezone": {"enum": ["utc", "browser", ""]},
        "refresh": {"type": "string", "pattern": "^$|^[0-9]+[smhd]$"},
        "graphTooltip": {"enum": [0, 1, 2]},
        "time": {
            "type": "object",
            "required": ["from", "to"],
            "properties": {"from": {"type": "string"}, "to": {"type": "string"}},
        },
        "templating": {
            "type": "object",
            "required": ["list"],
            "properties": {
                "list": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name", "type"],
                        "properties": {
                            "name": {"type": "string", "pattern": "^[a-zA-Z_][a-zA-Z0-9_]*$"},
                            "type": {"enum": ["query", "datasource", "custom", "constant"]},
                        },
                    },
                }
            },
        },
        "panels": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["id", "type", "title", "gridPos", "targets", "datasource"],
                "properties": {
                    "id": {"type": "integer", "minimum": 1},
                    "type": {"enum": ["timeseries", "table", "stat", "bargauge", "gauge"]},
                    "title": {"type": "string", "minLength": 1},
                    "datasource": _DATASOURCE,
                    "gridPos": {
                        "type": "object",
                        "required": ["x", "y", "w", "h"],
                        "properties": {
                            "x": {"type": "integer", "minimum": 0, "maximum": 23},
                            "y": {"type": "integer", "minimum": 0},
                            "w": {"type": "integer", "minimum": 1, "maximum": 24},
                            "h": {"type": "integer", "minimum": 1},
                        },
                    },
                    "targets": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["expr", "refId", "datasource"],
                            "properties": {
                                "expr": {"type": "string", "minLength": 1},
                                "refId": {"type": "string", "pattern": "^[A-Z]$"},
                                "datasource": _DATASOURCE,
                            },
                        },
                    },
                },
            },
        },
    },
}


def board() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(BOARD.read_text())
    return data


def queries() -> list[str]:
    exprs = [t["expr"] for p in board()["panels"] for t in p["targets"]]
    variables = [v["definition"] for v in board()["templating"]["list"] if v["type"] == "query"]
    return exprs + variables


def exported() -> set[str]:
    """Every series name the operator's registry renders once a run was observed."""
    metrics = Metrics()
    ref = RunRef(namespace="ns", name="run", uid="u")
    counts = {"total": 4, "pending": 1, "processing": 1, "completed": 1, "failed": 1,
              "retrying": 0, "stuck": 0}  # fmt: skip
    usage = {"targets": [{"name": "t", "tokensIn": 1, "tokensOut": 2, "cost": 0.5}]}
    batches = {"items": 1, "openCount": 1, "answeredByBatch": "0.0%", "open": []}
    status = {"phase": "Running", "counts": counts, "throughput": "1.0/s", "usage": usage,
              "batches": batches}  # fmt: skip
    metrics.observe(ref, status, None, throughput=1.0)
    metrics.reconcile_errors.labels("test").inc()
    calls = TargetCalls(outcomes={"ok": 1}, latency_count=1, latency_buckets=[1] * 11)
    metrics.providers.observe_calls(ref, {"t": calls})
    metrics.providers.observe_paused(ref, {"t": False})
    text = generate_latest(metrics.registry).decode()
    return set(re.findall(r"^(analysisq_\w+?)(?:\{| )", text, re.MULTILINE))


def test_the_dashboard_is_valid_against_the_json_model() -> None:
    jsonschema.validate(board(), SCHEMA)


def test_panel_ids_are_unique_and_panels_fit_the_grid() -> None:
    panels = board()["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for p in panels:
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, p["title"]


def test_every_query_names_a_metric_the_code_exports() -> None:
    names = exported()
    for expr in queries():
        used = set(re.findall(r"\banalysisq_\w+", expr))
        assert used, f"a query without an analysisq metric: {expr}"
        assert used <= names, f"{expr} uses {used - names}, not exported"
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr


def test_the_web_page_panels_are_all_there() -> None:
    titles = {p["title"] for p in board()["panels"]}
    assert {
        "Progress", "Items over time", "Throughput per target", "Latency percentiles per target",
        "Tokens per target", "Items by latest provider outcome", "Stuck and failed items",
        "Paused targets", "429s and deferrals", "Cost per target",
    } <= titles  # fmt: skip


def test_the_chart_ships_it_for_the_sidecar() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["grafana"] == {**values["grafana"], "enabled": False}
    assert values["grafana"]["labels"] == {"grafana_dashboard": "1"}
    template = (CHART / "templates" / "grafana-dashboard-configmap.yaml").read_text()
    assert '.Files.Get "files/grafana-dashboard.json"' in template


def test_provider_calls_are_read_at_most_every_refresh_interval() -> None:
    from analysisq.kube.provider_metrics import ProviderCollector

    REFRESH_SECONDS = 60.0
    now = [1000.0]
    collector = ProviderCollector(REFRESH_SECONDS, clock=lambda: now[0])
    ref = RunRef(namespace="ns", name="run", uid="u")
    assert collector.due(ref)
    collector.observe_calls(ref, {"t": TargetCalls()})
    now[0] += REFRESH_SECONDS - 1
    assert not collector.due(ref)
    now[0] += 1
    assert collector.due(ref)
    collector.forget(ref)
    assert collector.due(ref) and all(not m.samples for m in collector.collect())

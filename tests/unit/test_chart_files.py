"""What can be checked about the chart, deploy/ and the Dockerfile without running anything.

The CRD copies must stay byte-identical to ``crds/analysisrun.yaml`` (Helm reads only the
chart's ``crds/``, kustomize only ``deploy/``); the run templates of the values files and the
examples must be valid specs; every value must be described by the schema; the image must be
non-root with the ``analysisq`` entrypoint. Rendering and applying are in tests/cluster.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import generate_latest

import analysisq
from analysisq.kube.metrics import Metrics
from analysisq.kube.ref import RunRef
from analysisq.queue.dashboard import TargetCalls
from analysisq.spec import PROVIDERS, load_spec_file, parse_spec

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "analysisq"
CRD = ROOT / "crds" / "analysisrun.yaml"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
EXAMPLES = sorted((ROOT / "deploy" / "examples").glob("*.yaml"))


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Helm's value merge: maps merge key by key, anything else is replaced."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


@pytest.mark.parametrize(
    "copy", [CHART / "crds" / "analysisrun.yaml", ROOT / "deploy" / "crds" / "analysisrun.yaml"]
)
def test_crd_copies_are_byte_identical(copy: Path) -> None:
    assert copy.read_bytes() == CRD.read_bytes(), (
        f"{copy.relative_to(ROOT)} differs from crds/analysisrun.yaml: "
        f"cp crds/analysisrun.yaml {copy.relative_to(ROOT)}"
    )


def test_chart_app_version_is_the_package_version() -> None:
    assert load(CHART / "Chart.yaml")["appVersion"] == analysisq.__version__


def test_ci_values_files_exist() -> None:
    assert len(CI_VALUES) >= 3


@pytest.mark.parametrize("values", [None, *CI_VALUES], ids=lambda p: p.name if p else "default")
def test_trigger_template_is_a_valid_spec(values: Path | None) -> None:
    defaults = load(CHART / "values.yaml")
    effective = merged(defaults, load(values)) if values else defaults
    if effective["trigger"]["enabled"]:
        parse_spec(effective["trigger"]["template"], source="trigger.template")


def _schema_paths(schema: dict[str, Any], prefix: str = "") -> set[str]:
    paths = set()
    for key, sub in (schema.get("properties") or {}).items():
        paths.add(prefix + key)
        if sub.get("type") == "object" and sub.get("additionalProperties") is False:
            paths |= _schema_paths(sub, prefix + key + ".")
    return paths


def _value_paths(values: dict[str, Any], schema: dict[str, Any], prefix: str = "") -> set[str]:
    """The keys of values.yaml, descending only where the schema is closed."""
    paths = set()
    for key, value in values.items():
        paths.add(prefix + key)
        sub = (schema.get("properties") or {}).get(key) or {}
        if isinstance(value, dict) and sub.get("additionalProperties") is False:
            paths |= _value_paths(value, sub, prefix + key + ".")
    return paths


def test_every_value_is_in_the_schema_and_the_schema_is_closed() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = load(CHART / "values.yaml")
    assert schema["additionalProperties"] is False
    missing = _value_paths(values, schema) - _schema_paths(schema)
    assert not missing, f"values without a schema entry: {sorted(missing)}"
    stale = {p for p in _schema_paths(schema) if "." not in p} - set(values) - {"global"}
    assert not stale, f"schema entries without a default value: {sorted(stale)}"


def test_the_database_url_cannot_be_a_value() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    database = schema["properties"]["database"]["properties"]
    assert set(database) == {"existingSecret", "key", "pooler"}
    assert database["pooler"]["enum"] == ["none", "transaction"]  # a mode, never a URL


def test_one_resource_kind_per_template() -> None:
    for path in (CHART / "templates").glob("*.yaml"):
        kinds = set(re.findall(r"^kind: (\w+)", path.read_text(), re.MULTILINE))
        assert len(kinds) == 1, f"{path.name} defines {kinds}"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_are_valid_runs(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    runs = [d for d in docs if d["kind"] == "AnalysisRun"]
    assert runs, f"{path.name} has no AnalysisRun"
    for doc in runs:
        assert "namespace" not in doc["metadata"], "examples take the namespace from kubectl -n"
        assert len(doc["metadata"]["name"]) <= 63
    load_spec_file(path)


def test_examples_cover_one_several_and_a_secret_key() -> None:
    specs = [load_spec_file(p) for p in EXAMPLES]
    assert any(len(s.targets) == 1 for s in specs)
    assert any(len(s.targets) > 1 for s in specs)
    assert any(
        t.provider == "openai" and t.endpoint and t.api_key_secret_ref
        for s in specs
        for t in s.targets
    )


def _final_stage(dockerfile: str) -> str:
    return dockerfile[dockerfile.rindex("\nFROM ") :]


def test_image_runs_as_numeric_non_root_with_the_cli_entrypoint() -> None:
    final = _final_stage((ROOT / "Dockerfile").read_text())
    user = re.search(r"^USER (\S+)", final, re.MULTILINE)
    assert user is not None and re.fullmatch(r"[1-9]\d*:[1-9]\d*", user.group(1))
    assert '\nENTRYPOINT ["analysisq"]' in final
    assert "PYTHONDONTWRITEBYTECODE=1" in final
    assert "HOME=/tmp" in final


def test_final_stage_installs_nothing() -> None:
    final = _final_stage((ROOT / "Dockerfile").read_text())
    assert not re.search(r"^RUN ", final, re.MULTILINE), "the final stage must only COPY"
    assert "COPY --from=builder /opt/analysisq /opt/analysisq" in final


def test_chart_pods_match_the_image_user() -> None:
    final = _final_stage((ROOT / "Dockerfile").read_text())
    user = re.search(r"^USER (\d+):(\d+)", final, re.MULTILINE)
    assert user is not None
    pod = load(CHART / "values.yaml")["podSecurityContext"]
    assert (str(pod["runAsUser"]), str(pod["runAsGroup"])) == user.groups()


def test_the_image_user_has_a_passwd_entry() -> None:
    """kopf asks getpass.getuser() for the operator's name: a uid without a passwd entry
    crashes the operator at start (seen on a real kubelet)."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    final = _final_stage(dockerfile)
    uid, gid = re.search(r"^USER (\d+):(\d+)", final, re.MULTILINE).groups()  # type: ignore[union-attr]
    builder = dockerfile[: dockerfile.index(final)]
    assert f"useradd --system --uid {uid} --gid {gid}" in builder
    assert re.search(rf"groupadd --system --gid {gid}\b", builder)
    assert "COPY --from=builder /etc/passwd /etc/group /etc/" in final


def test_build_context_is_only_the_source() -> None:
    lines = [
        line
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert lines[0] == "*"
    assert {"!pyproject.toml", "!README.md", "!sql/", "!operator/"} <= set(lines)


def test_schema_knows_the_providers_of_the_spec() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    target = schema["properties"]["trigger"]["properties"]["template"]["properties"]["targets"]
    assert tuple(target["items"]["properties"]["provider"]["enum"]) == PROVIDERS


def test_alerts_use_metrics_the_operator_exposes() -> None:
    metrics = Metrics()
    ref = RunRef(namespace="ns", name="run", uid="u")
    status = {
        "phase": "Running",
        "counts": {"total": 10, "pending": 1, "processing": 1, "completed": 6, "failed": 1,
                   "retrying": 1, "stuck": 0},
        "workers": {"desired": 2, "ready": 2},
        "throughput": "1.5/s",
    }  # fmt: skip
    metrics.observe(ref, status, deadline=2_000_000_000.0, throughput=1.5)
    metrics.reconcile_errors.labels("test").inc()
    metrics.providers.observe_calls(ref, {"t": TargetCalls(outcomes={"ok": 1})})
    metrics.providers.observe_paused(ref, {"t": True})
    exposed = set(
        re.findall(
            r"^(analysisq_\w+?)(?:\{| )", generate_latest(metrics.registry).decode(), re.MULTILINE
        )
    )
    used = set(
        re.findall(r"\banalysisq_\w+", (CHART / "templates" / "prometheusrule.yaml").read_text())
    )
    assert used, "no metric in the PrometheusRule"
    assert used <= exposed, f"alerts on metrics the operator does not expose: {used - exposed}"
    statuses = set(
        re.findall(r'status="(\w+)"', (CHART / "templates" / "prometheusrule.yaml").read_text())
    )
    assert statuses <= set(status["counts"])

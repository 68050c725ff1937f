"""The Helm chart and deploy/ with a real helm and a real API server.

``helm lint --strict`` for the default values and every ``ci/*-values.yaml``; each of those
renders applied with a server-side dry run and then for real into a namespace that enforces
the restricted Pod Security level (no warning allowed); the guards and the schema refuse
contradictory values; deploy/analysisq.yaml is the chart's render; ``kubectl apply -k
deploy/`` works; the examples are accepted by the API server.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from controlplane.fixtures import Kubectl
from tools.cluster import (
    apply_analysisrun_crd,
    apply_monitoring_crds,
    apply_stream,
    create_namespace,
    delete_namespace,
    delete_stream,
)
from tools.helm import (
    CHART,
    DEPLOY,
    DEPLOY_NAMESPACE,
    DEPLOY_OUTPUT,
    HelmError,
    deploy_manifests,
    documents,
    helm_binary,
    render,
    run_helm,
)

pytestmark = pytest.mark.cluster

CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
VARIANTS = [None, *CI_VALUES]
EXAMPLES = sorted((DEPLOY / "examples").glob("*.yaml"))


def variant_id(values: Path | None) -> str:
    return values.name.removesuffix("-values.yaml") if values else "default"


@pytest.fixture(scope="session")
def helm() -> Path:
    return helm_binary()


@pytest.mark.parametrize("values", VARIANTS, ids=variant_id)
def test_lint_strict(helm: Path, values: Path | None) -> None:
    args = ["lint", "--strict", str(CHART)]
    if values:
        args += ["--values", str(values)]
    out = run_helm(helm, *args).stdout
    assert "0 chart(s) failed" in out
    assert "[WARNING]" not in out and "[ERROR]" not in out


def test_deploy_manifests_are_the_chart_render(helm: Path) -> None:
    assert DEPLOY_OUTPUT.read_text() == deploy_manifests(helm), (
        "deploy/analysisq.yaml is stale: run `python tests/tools/helm.py`"
    )


@pytest.mark.parametrize(
    ("set_values", "message"),
    [
        (["operator.clusterWide=true", "operator.watchNamespaces={a}"], "contradict"),
        (["database.existingSecret="], "database.existingSecret is required"),
        (["serviceMonitor.enabled=true", "metrics.enabled=false"], "needs metrics.enabled"),
        (["prometheusRule.enabled=true", "metrics.enabled=false"], "needs metrics.enabled"),
        (["metrics.port=8080"], "must differ"),
        (["trigger.template.targets=null"], "at least one target"),
        (["operator.serviceAccount.create=false"], "operator.serviceAccount.name is required"),
        (["trigger.serviceAccount.create=false"], "trigger.serviceAccount.name is required"),
        (["dashboard.enabled=true", "dashboard.port=8080"], "dashboard.port must differ"),
        (["dashboard.actionTokenSecret=s"], "needs dashboard.enabled"),
    ],
)
def test_contradictory_values_fail_with_a_reason(
    helm: Path, set_values: list[str], message: str
) -> None:
    with pytest.raises(HelmError, match=message):
        render(helm, set_values=set_values)


@pytest.mark.parametrize(
    "set_values",
    [
        ["operator.replicas=2"],
        ["database.url=postgresql://u:p@h/db"],
        ["trigger.keep=-1"],
        ["trigger.prefix=Daily"],
        ["trigger.deadlineIn=tomorrow"],
        ["image.pullPolicy=Sometimes"],
        ["trigger.template.targets[0].provider=nope"],
        ["operator.logLevel=TRACE"],
        ["retention.olderThan=soon"],
        ["database.pooler=session"],
        ["unknownKey=1"],
    ],
)
def test_schema_refuses_bad_values(helm: Path, set_values: list[str]) -> None:
    with pytest.raises(HelmError, match="values don't meet the specifications of the schema"):
        render(helm, set_values=set_values)


def test_default_render_has_every_role(helm: Path) -> None:
    docs = documents(render(helm, namespace="ns"))
    by_kind: dict[str, list[str]] = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc["metadata"]["name"])
    assert by_kind["ServiceAccount"] == [
        "analysisq-operator",
        "analysisq-trigger",
        "analysisq-worker",
    ]
    assert by_kind["Deployment"] == ["analysisq-operator"]
    assert by_kind["CronJob"] == ["analysisq-trigger"]
    assert by_kind["Job"] == ["analysisq-migrate"]
    assert "Secret" not in by_kind, "the chart never holds the database URL"
    (cron,) = [d for d in docs if d["kind"] == "CronJob"]
    assert cron["spec"]["schedule"] == "0 2 * * *"
    assert cron["spec"]["timeZone"] == "Etc/UTC"
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert deployment["spec"]["replicas"] == 1
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert {"name": "DATABASE_URL", "value": None} not in container["env"]
    assert all("value" not in e for e in container["env"] if e["name"] == "DATABASE_URL")


def test_retention_is_a_daily_prune_when_enabled(helm: Path) -> None:
    def crons(*set_values: str) -> dict[str, dict[str, object]]:
        docs = documents(render(helm, namespace="ns", set_values=list(set_values)))
        return {d["metadata"]["name"]: d for d in docs if d["kind"] == "CronJob"}

    assert set(crons()) == {"analysisq-trigger"}  # off by default
    cron = crons("retention.enabled=true", "retention.olderThan=7d", "retention.results=true")
    job = cron["analysisq-retention"]["spec"]["jobTemplate"]["spec"]  # type: ignore[index]
    (container,) = job["template"]["spec"]["containers"]
    assert container["args"] == ["prune", "--older-than", "7d", "--results"]
    env = {e["name"]: e for e in container["env"]}
    assert env["DATABASE_URL"]["valueFrom"]["secretKeyRef"]["name"] == "analysisq-database"
    assert env["ANALYSISQ_DATABASE_POOLER"]["value"] == "none"


def test_dashboard_and_grafana_render_when_enabled(helm: Path) -> None:
    assert not [
        d for d in documents(render(helm, namespace="ns")) if "dashboard" in d["metadata"]["name"]
    ]
    docs = documents(
        render(
            helm,
            namespace="ns",
            set_values=[
                "dashboard.enabled=true",
                "dashboard.actionTokenSecret=dash",
                "grafana.enabled=true",
            ],
        )
    )
    (service,) = [d for d in docs if d["metadata"]["name"] == "analysisq-dashboard"]
    assert service["kind"] == "Service" and service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"][0]["targetPort"] == "dashboard"
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "dashboard", "containerPort": 8765, "protocol": "TCP"} in container["ports"]
    (token,) = [e for e in container["env"] if e["name"] == "ANALYSISQ_DASHBOARD_ACTION_TOKEN"]
    assert token["valueFrom"]["secretKeyRef"] == {"name": "dash", "key": "token"}
    (config,) = [d for d in docs if d["metadata"]["name"] == "analysisq-operator"
                 and d["kind"] == "ConfigMap"]  # fmt: skip
    assert config["data"]["ANALYSISQ_DASHBOARD_PORT"] == "8765"
    (board,) = [d for d in docs if d["metadata"]["name"] == "analysisq-grafana-dashboard"]
    assert board["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = json.loads(board["data"]["analysisq.json"])
    assert shipped == json.loads((CHART / "files" / "grafana-dashboard.json").read_text())


def test_config_checksum_rolls_the_operator(helm: Path) -> None:
    def checksum(*set_values: str) -> str:
        docs = documents(render(helm, set_values=list(set_values)))
        (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
        return str(deployment["spec"]["template"]["metadata"]["annotations"]["checksum/config"])

    assert checksum() == checksum()
    assert checksum() != checksum("operator.reconcileSeconds=30")


def _warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("Warning")]


@pytest.fixture
def watched_namespaces(kubectl: Kubectl) -> Iterator[None]:
    """The namespaces ci/watch-namespaces-values.yaml names."""
    names = yaml.safe_load((CHART / "ci" / "watch-namespaces-values.yaml").read_text())
    created = names["operator"]["watchNamespaces"]
    for name in created:
        create_namespace(kubectl, name)
    yield
    for name in created:
        delete_namespace(kubectl, name)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("values", VARIANTS, ids=variant_id)
def test_render_applies_to_the_api_server(
    helm: Path,
    kubectl: Kubectl,
    namespace: str,
    values: Path | None,
    watched_namespaces: None,
) -> None:
    apply_analysisrun_crd(kubectl)
    apply_monitoring_crds(kubectl)
    kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted")
    stream = render(helm, release="aq-ci", namespace=namespace, values=[values] if values else [])
    try:
        stderr = apply_stream(kubectl, stream)
        assert not _warnings(stderr), stderr
        listed = kubectl("get", "-f", "-", "-o", "name", input=stream).stdout.split()
        assert len(listed) == len(documents(stream))
    finally:
        delete_stream(kubectl, stream)


@pytest.mark.timeout(180)
def test_kubectl_apply_k_deploy(kubectl: Kubectl) -> None:
    # Server-side dry runs of namespaced objects need their namespace and CRD to exist.
    kubectl("apply", "-f", str(DEPLOY / "namespace.yaml"))
    apply_analysisrun_crd(kubectl)
    try:
        kubectl("apply", "--server-side", "--dry-run=server", "-k", str(DEPLOY))
        # docs/install.md: server-side, because the CRD outgrows the last-applied annotation.
        result = kubectl("apply", "--server-side", "-k", str(DEPLOY))
        assert not _warnings(result.stderr), result.stderr
        cron = json.loads(
            kubectl(
                "get", "cronjob", "analysisq-trigger", "-o", "json", namespace=DEPLOY_NAMESPACE
            ).stdout
        )
        assert cron["spec"]["schedule"] == "0 2 * * *"
        # The plain client-side form works too, and applying again changes nothing.
        kubectl("apply", "-k", str(DEPLOY))
        again = kubectl("apply", "--server-side", "-k", str(DEPLOY)).stdout
        assert "serverside-applied" in again
    finally:
        built = kubectl("kustomize", str(DEPLOY)).stdout
        without_crd = "\n---\n".join(
            yaml.safe_dump(d) for d in documents(built) if d["kind"] != "CustomResourceDefinition"
        )
        delete_stream(kubectl, without_crd)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_are_accepted_by_the_api_server(
    kubectl: Kubectl, namespace: str, path: Path
) -> None:
    apply_analysisrun_crd(kubectl)
    kubectl("apply", "--dry-run=server", "-f", str(path), namespace=namespace)

"""The worker Deployment manifest: command, Secrets by reference, ownership, security, scale."""

from __future__ import annotations

import json
from typing import Any

import pytest

from analysisq.kube.deployment import (
    CONFIG_HASH,
    DEFAULT_RESOURCES,
    RESUME_ANNOTATION,
    config_hash,
    desired_replicas,
    secret_refs,
    worker_deployment,
)
from analysisq.kube.ref import RunRef
from analysisq.settings import Settings
from analysisq.spec import AnalysisRunSpec, parse_spec

pytestmark = pytest.mark.unit

REF = RunRef(namespace="team-a", name="daily-20250101", uid="0f0e-uid", generation=3)


def settings(**kw: Any) -> Settings:
    return Settings(worker_image="registry.example/analysisq:1.2.3", **kw)


def spec(**kw: Any) -> AnalysisRunSpec:
    data: dict[str, Any] = {
        "targets": [
            {
                "name": "gpt-mini",
                "provider": "openai",
                "model": "gpt-4o-mini",
                "apiKeySecretRef": {"name": "openai", "key": "api-key"},
            },
            {"name": "local", "provider": "echo", "model": "echo"},
        ],
        "workers": 7,
    }
    data.update(kw)
    return parse_spec(data)


def container(manifest: dict[str, Any]) -> dict[str, Any]:
    (only,) = manifest["spec"]["template"]["spec"]["containers"]
    return dict(only)


def env(manifest: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e for e in container(manifest)["env"]}


def test_the_worker_runs_the_run_from_the_operators_image() -> None:
    m = worker_deployment(REF, spec(), settings(), replicas=7)
    c = container(m)
    assert c["image"] == "registry.example/analysisq:1.2.3"
    assert c["command"] == ["analysisq", "worker", "--run", "team-a/daily-20250101/0f0e-uid"]
    assert m["metadata"]["name"] == "daily-20250101-workers"
    assert m["metadata"]["namespace"] == "team-a"
    assert m["spec"]["replicas"] == 7


def test_secrets_are_referenced_never_inlined() -> None:
    m = worker_deployment(REF, spec(), settings(), replicas=1)
    variables = env(m)
    assert variables["DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "analysisq-database",
        "key": "url",
    }
    assert variables["ANALYSISQ_API_KEY_GPT_MINI"]["valueFrom"]["secretKeyRef"] == {
        "name": "openai",
        "key": "api-key",
    }
    assert "ANALYSISQ_API_KEY_LOCAL" not in variables
    assert variables["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    literal = [e for e in container(m)["env"] if "value" in e]
    assert {e["name"] for e in literal} <= {
        "ANALYSISQ_LOG_FORMAT",
        "ANALYSISQ_LOG_LEVEL",
        "ANALYSISQ_SHUTDOWN_GRACE_SECONDS",
        "ANALYSISQ_DATABASE_POOLER",
    }


def test_workers_reach_the_database_through_the_operators_pooler_mode() -> None:
    for mode in ("none", "transaction"):
        m = worker_deployment(REF, spec(), settings(database_pooler=mode), replicas=1)
        assert env(m)["ANALYSISQ_DATABASE_POOLER"]["value"] == mode


def test_a_runs_own_database_secret_and_api_key_env_are_honoured() -> None:
    s = spec(
        databaseSecretRef={"name": "other-db", "key": "dsn"},
        targets=[
            {
                "name": "a",
                "provider": "openai",
                "model": "m",
                "apiKeyEnv": "OPENAI_API_KEY",
                "apiKeySecretRef": {"name": "k", "key": "v"},
            }
        ],
    )
    variables = env(worker_deployment(REF, s, settings(), replicas=1))
    assert variables["DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "other-db",
        "key": "dsn",
    }
    # The worker reads apiKeyEnv first, so that is the variable the Secret fills.
    assert variables["OPENAI_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "k", "key": "v"}
    assert [(r.name, r.key) for r in secret_refs(s, settings())] == [
        ("other-db", "dsn"),
        ("k", "v"),
    ]


def test_the_run_owns_the_deployment_as_its_controller() -> None:
    m = worker_deployment(REF, spec(), settings(), replicas=1)
    (owner,) = m["metadata"]["ownerReferences"]
    assert owner == {
        "apiVersion": "analysisq.io/v1alpha1",
        "kind": "AnalysisRun",
        "name": "daily-20250101",
        "uid": "0f0e-uid",
        "controller": True,
        "blockOwnerDeletion": True,
    }


def test_labels_let_the_pods_be_found_and_the_selector_is_stable() -> None:
    m = worker_deployment(REF, spec(), settings(), replicas=1)
    labels = m["spec"]["template"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/name"] == "analysisq"
    assert labels["app.kubernetes.io/component"] == "worker"
    assert labels["analysisq.io/run"] == "daily-20250101"
    selector = m["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    other = worker_deployment(REF, spec(batchSize=9), settings(), replicas=2)
    assert other["spec"]["selector"] == m["spec"]["selector"]


def test_the_pod_is_restricted_and_has_time_to_release_its_claims() -> None:
    m = worker_deployment(REF, spec(), settings(worker_grace_seconds=45), replicas=1)
    pod = m["spec"]["template"]["spec"]
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert pod["automountServiceAccountToken"] is False
    sc = container(m)["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert pod["terminationGracePeriodSeconds"] == 45
    shutdown = int(env(m)["ANALYSISQ_SHUTDOWN_GRACE_SECONDS"]["value"])
    assert 0 < shutdown < 45


def test_resources_come_from_the_spec_or_the_defaults() -> None:
    m = worker_deployment(REF, spec(), settings(), replicas=1)
    assert container(m)["resources"] == DEFAULT_RESOURCES
    s = spec(resources={"requests": {"cpu": "250m"}, "limits": {"memory": "1Gi", "cpu": 1}})
    assert container(worker_deployment(REF, s, settings(), replicas=1))["resources"] == {
        "requests": {"cpu": "250m"},
        "limits": {"memory": "1Gi", "cpu": 1},
    }


def test_replicas_follow_workers_suspend_and_the_end_of_the_run() -> None:
    assert desired_replicas(spec(), finished=False) == 7
    assert desired_replicas(spec(suspend=True), finished=False) == 0
    assert desired_replicas(spec(), finished=True) == 0
    assert desired_replicas(spec(workers=0), finished=False) == 0


def test_scaling_does_not_restart_workers_but_worker_settings_do() -> None:
    base = config_hash(spec())
    assert config_hash(spec(workers=50, suspend=True, onDelete="Delete")) == base
    assert config_hash(spec(targetFaultThreshold=10)) == base  # the database reads it
    assert config_hash(spec(batchSize=10)) != base
    assert config_hash(spec(leaseSeconds=30)) != base
    m = worker_deployment(REF, spec(), settings(), replicas=1, resume_token="2025-01-01T00:00")
    annotations = m["spec"]["template"]["metadata"]["annotations"]
    assert annotations[CONFIG_HASH] == base
    assert annotations[RESUME_ANNOTATION] == "2025-01-01T00:00"


def test_the_manifest_is_plain_json() -> None:
    m = worker_deployment(REF, spec(), settings(worker_service_account="workers"), replicas=1)
    assert json.loads(json.dumps(m)) == m
    assert m["spec"]["template"]["spec"]["serviceAccountName"] == "workers"


def test_raising_a_budget_does_not_restart_workers_but_adding_one_does() -> None:
    # Workers read a budget's amounts from the database at each reservation; only whether
    # the run has a budget at all changes what they do.
    priced = {"name": "t", "provider": "echo", "model": "m",
              "pricing": {"inputPerMillionTokens": 1, "outputPerMillionTokens": 1}}  # fmt: skip
    unbudgeted = config_hash(spec(targets=[priced]))
    low = config_hash(spec(targets=[priced], budget={"maxCost": 10}))
    assert config_hash(spec(targets=[priced], budget={"maxCost": 40, "maxTokens": 9})) == low
    assert low != unbudgeted

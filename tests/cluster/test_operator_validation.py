"""Invalid AnalysisRuns are refused by the API server at `kubectl apply`, with a message a
person understands: the CRD's structural schema and CEL rules, no operator involved."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from operator_env import analysisrun_crd_fixture  # noqa: F401 (fixture)

from controlplane.fixtures import Kubectl

pytestmark = pytest.mark.cluster

ECHO = {"name": "a", "provider": "echo", "model": "m"}
PRICE = {"inputPerMillionTokens": 1, "outputPerMillionTokens": 2}


def manifest(name: str, spec: dict[str, Any] | None) -> str:
    doc: dict[str, Any] = {
        "apiVersion": "analysisq.io/v1alpha1",
        "kind": "AnalysisRun",
        "metadata": {"name": name},
    }
    if spec is not None:
        doc["spec"] = spec
    return yaml.safe_dump(doc)


INVALID: list[tuple[str, dict[str, Any] | None, str]] = [
    ("no-spec", None, "spec: Required value"),
    ("no-targets", {"targets": []}, "spec.targets in body should have at least 1 items"),
    (
        "negative-workers",
        {"workers": -1, "targets": [ECHO]},
        "spec.workers in body should be greater than or equal to 0",
    ),
    (
        "unknown-provider",
        {"targets": [{**ECHO, "provider": "gemini"}]},
        'spec.targets[0].provider: Unsupported value: "gemini": supported values: '
        '"openai", "anthropic", "http", "echo"',
    ),
    (
        "zero-batch",
        {"batchSize": 0, "targets": [ECHO]},
        "spec.batchSize in body should be greater than or equal to 1",
    ),
    (
        "secret-ref-without-key",
        {"targets": [{**ECHO, "provider": "openai", "apiKeySecretRef": {"name": "openai"}}]},
        "spec.targets[0].apiKeySecretRef.key: Required value",
    ),
    (
        "http-without-endpoint",
        {"targets": [{**ECHO, "provider": "http"}]},
        "spec.targets[0].endpoint: Required value: a target with provider 'http' needs an endpoint",
    ),
    (
        "duplicate-targets",
        {"targets": [ECHO, {**ECHO, "model": "other"}]},
        'spec.targets[1]: Duplicate value: {"name":"a"}',
    ),
    (
        "bad-target-name",
        {"targets": [{**ECHO, "name": "Not_A_Label"}]},
        "spec.targets[0].name in body should match",
    ),
    (
        "ftp-endpoint",
        {"targets": [{**ECHO, "provider": "openai", "endpoint": "ftp://models"}]},
        "spec.targets[0].endpoint in body should match '^https?://",
    ),
    (
        "batch-mode-on-echo",
        {"targets": [{**ECHO, "mode": "batch"}]},
        "spec.targets[0].mode: Invalid value: \"object\": mode 'batch' needs a provider with a "
        "Batch API (openai or anthropic)",
    ),
    (
        "openai-batch-too-large",
        {
            "targets": [
                {**ECHO, "provider": "openai", "mode": "batch", "batch": {"maxRequests": 60000}}
            ]
        },
        "OpenAI takes at most 50000 requests per batch",
    ),
    (
        "ratio-above-one",
        {"maxFailedRatio": 1.5, "targets": [ECHO]},
        "spec.maxFailedRatio in body should be less than or equal to 1",
    ),
    (
        "short-lease",
        {"leaseSeconds": 1, "targets": [ECHO]},
        "spec.leaseSeconds in body should be greater than or equal to 5",
    ),
    (
        "bad-on-delete",
        {"onDelete": "Archive", "targets": [ECHO]},
        'spec.onDelete: Unsupported value: "Archive": supported values: "Keep", "Delete"',
    ),
    (
        "bad-quantity",
        {"resources": {"limits": {"memory": "lots"}}, "targets": [ECHO]},
        "spec.resources.limits.memory in body should match",
    ),
    (
        "unknown-field",
        {"numWorkers": 3, "targets": [ECHO]},
        'unknown field "spec.numWorkers"',
    ),
    (
        "x" * 64,
        {"targets": [ECHO]},
        "an AnalysisRun name must be at most 63 characters",
    ),
    # quotas: prices, budgets and pools
    (
        "negative-price",
        {"targets": [{**ECHO, "pricing": {**PRICE, "inputPerMillionTokens": -1}}]},
        "spec.targets[0].pricing.inputPerMillionTokens in body should be greater than or "
        "equal to 0",
    ),
    (
        "text-price",
        {"targets": [{**ECHO, "pricing": {**PRICE, "outputPerMillionTokens": "cheap"}}]},
        'spec.targets[0].pricing.outputPerMillionTokens: Invalid value: "string": '
        "spec.targets[0].pricing.outputPerMillionTokens in body must be of type number",
    ),
    (
        "zero-budget",
        {"targets": [{**ECHO, "pricing": PRICE}], "budget": {"maxCost": 0}},
        "spec.budget.maxCost in body should be greater than 0",
    ),
    (
        "zero-token-budget",
        {"targets": [ECHO], "budget": {"maxTokens": 0}},
        "spec.budget.maxTokens in body should be greater than or equal to 1",
    ),
    (
        "empty-budget",
        {"targets": [ECHO], "budget": {}},
        "spec.budget: Required value: budget needs maxCost, maxTokens or both",
    ),
    (
        "cost-budget-unpriced",
        {"targets": [ECHO], "budget": {"maxCost": 5}},
        "spec.budget.maxCost: Required value: budget.maxCost needs targets[].pricing",
    ),
    (
        "bad-pool-name",
        {"targets": [{**ECHO, "rateLimit": {"pool": "Team_Key"}}]},
        'spec.targets[0].rateLimit.pool: Invalid value: "string": rateLimit.pool must be a '
        "DNS label",
    ),
    (
        "conflicting-pool",
        {
            "targets": [
                {**ECHO, "rateLimit": {"pool": "key", "requestsPerSecond": 20}},
                {**ECHO, "name": "b", "rateLimit": {"pool": "key", "requestsPerSecond": 30}},
            ]
        },
        'spec.targets: Invalid value: "object": targets[].rateLimit: targets naming the same '
        "pool must state the same requestsPerSecond and tokensPerMinute",
    ),
]


@pytest.mark.parametrize(("name", "spec", "message"), INVALID, ids=[i[0][:20] for i in INVALID])
def test_an_invalid_spec_is_refused_at_apply_with_a_readable_message(
    analysisrun_crd: str,
    kubectl: Kubectl,
    namespace: str,
    name: str,
    spec: dict[str, Any] | None,
    message: str,
) -> None:
    result = kubectl("apply", "-f", "-", input=manifest(name, spec), namespace=namespace,
                     check=False)  # fmt: skip
    assert result.returncode != 0, result.stdout
    assert message in result.stderr, result.stderr
    assert kubectl("get", "analysisruns", "-o", "name", namespace=namespace).stdout == ""


IMMUTABLE: list[tuple[str, list[dict[str, Any]], str]] = [
    (
        "prompts",
        [{"op": "replace", "path": "/spec/prompts", "value": {"tags": ["other"]}}],
        "spec.prompts: Forbidden: prompts cannot change: the queue was filled from this selection",
    ),
    (
        "target-provider",
        [{"op": "replace", "path": "/spec/targets/0/provider", "value": "openai"}],
        "spec.targets[0]: Forbidden: a target's provider cannot change",
    ),
    (
        "target-params",
        [{"op": "replace", "path": "/spec/targets/0/params/temperature", "value": 1}],
        "spec.targets[0].params: Forbidden: a target's params cannot change",
    ),
    (
        "added-target",
        [{"op": "add", "path": "/spec/targets/-", "value": {**ECHO, "name": "b"}}],
        "spec.targets: Forbidden: targets cannot be added, removed, renamed or reordered",
    ),
    (
        "database",
        [{"op": "add", "path": "/spec/databaseSecretRef", "value": {"name": "x", "key": "y"}}],
        "spec: Forbidden: databaseSecretRef cannot change",
    ),
]


@pytest.mark.parametrize(("field", "patch", "message"), IMMUTABLE, ids=[i[0] for i in IMMUTABLE])
def test_fields_the_queue_depends_on_cannot_change(
    analysisrun_crd: str,
    kubectl: Kubectl,
    namespace: str,
    field: str,
    patch: list[dict[str, Any]],
    message: str,
) -> None:
    spec = {
        "prompts": {"tags": ["daily"]},
        "targets": [{**ECHO, "params": {"temperature": 0}}],
        "workers": 0,
    }
    kubectl("apply", "-f", "-", input=manifest("fixed", spec), namespace=namespace)
    result = kubectl("patch", "analysisrun", "fixed", "--type=json", "-p", json.dumps(patch),
                     namespace=namespace, check=False)  # fmt: skip
    assert result.returncode != 0, result.stdout
    assert message in result.stderr, result.stderr
    assert "create a new AnalysisRun" in result.stderr


def test_mutable_fields_can_change_and_defaults_are_filled_in(
    analysisrun_crd: str, kubectl: Kubectl, namespace: str
) -> None:
    spec = {"targets": [{**ECHO, "provider": "openai", "endpoint": "http://llm:8000/v1"}]}
    kubectl("apply", "-f", "-", input=manifest("flexible", spec), namespace=namespace)
    patch = {
        "spec": {
            "workers": 3,
            "suspend": True,
            "batchSize": 10,
            "onDelete": "Delete",
            "deadline": "2030-01-01T06:00:00Z",
        }
    }
    kubectl("patch", "analysisrun", "flexible", "--type=merge", "-p", json.dumps(patch),
            namespace=namespace)  # fmt: skip
    kubectl(
        "patch", "analysisrun", "flexible", "--type=json", "-p",
        '[{"op":"add","path":"/spec/targets/0/rateLimit","value":{"requestsPerSecond":5}}]',
        namespace=namespace,
    )  # fmt: skip
    got = yaml.safe_load(
        kubectl("get", "analysisrun", "flexible", "-o", "yaml", namespace=namespace).stdout
    )["spec"]
    assert got["workers"] == 3 and got["suspend"] is True and got["batchSize"] == 10
    assert got["maxAttempts"] == 3 and got["leaseSeconds"] == 60 and got["prompts"] == {}
    assert got["targets"][0]["timeoutSeconds"] == 60
    assert got["targets"][0]["rateLimit"] == {"requestsPerSecond": 5}
    # pricing, a pool and a budget may be set and raised on a live run
    kubectl(
        "patch", "analysisrun", "flexible", "--type=json", "-p", json.dumps([
            {"op": "add", "path": "/spec/targets/0/pricing", "value": PRICE},
            {"op": "add", "path": "/spec/targets/0/rateLimit/pool", "value": "team-key"},
            {"op": "add", "path": "/spec/budget", "value": {"maxCost": 5}},
        ]), namespace=namespace,
    )  # fmt: skip
    kubectl("patch", "analysisrun", "flexible", "--type=merge", "-p",
            '{"spec":{"budget":{"maxCost":50}}}', namespace=namespace)  # fmt: skip
    got = yaml.safe_load(
        kubectl("get", "analysisrun", "flexible", "-o", "yaml", namespace=namespace).stdout
    )["spec"]
    assert got["budget"] == {"maxCost": 50}
    assert got["targets"][0]["pricing"] == {**PRICE, "batchDiscount": 0.5}

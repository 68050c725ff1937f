"""The operator's dashboard against the real control plane: it lists the cluster's runs,
refuses actions without the token from its Secret, and with it suspends, resumes and retries
an AnalysisRun by patching it (the operator then acts); the provider metrics
derived from the database appear on the operator's /metrics.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import quote

import pytest
from operator_env import (  # noqa: F401 (fixtures)
    FakeProviders,
    OperatorFactory,
    analysis_run,
    analysisrun_crd_fixture,
    apply,
    fake_providers_fixture,
    get_deployment,
    get_run,
    operators_fixture,
    queue_counts,
    seed_prompts,
    wait_for,
)

from controlplane.fixtures import Kubectl
from controlplane.harness import free_port

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]

TOKEN = "dashboard-token-0123456789"


def call(url: str, *, data: Any = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    body = None if data is None else json.dumps(data).encode()
    request = urllib.request.Request(url, data=body, headers=headers or {}, method=None)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            raw = response.read().decode()
            status = response.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read().decode(), exc.code
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw


def test_operator_dashboard_reads_and_acts_through_the_analysisrun(
    operators: OperatorFactory,
    namespace: str,
    kubectl: Kubectl,
    db_url: str,
    fake_providers: FakeProviders,
) -> None:
    seed_prompts(db_url, 300)
    provider = fake_providers("--latency-ms", "100")
    port = free_port()
    op = operators(
        [namespace],
        extra_env={
            "ANALYSISQ_DASHBOARD_PORT": str(port),
            "ANALYSISQ_DASHBOARD_ACTION_TOKEN": TOKEN,
            "ANALYSISQ_PROVIDER_METRICS_SECONDS": "1",
        },
    )
    target = {"name": "fake", "provider": "openai", "model": "m", "endpoint": provider.url}
    apply(kubectl, namespace, analysis_run("watched", workers=1, batchSize=1, targets=[target]))
    run_id = wait_for(lambda: get_run(kubectl, namespace, "watched")["status"]["runId"])
    wait_for(lambda: queue_counts(db_url, run_id).get("completed", 0) >= 5, timeout=90)

    base = f"http://127.0.0.1:{port}"
    status, listed = call(f"{base}/api/runs")
    assert status == 200 and run_id in [r["id"] for r in listed["runs"]]
    api = f"{base}/api/runs/{quote(run_id)}"
    status, one = call(api)
    assert status == 200 and one["actions"] == {
        "enabled": True,
        "token_required": True,
        "available": ["resume", "resume-target", "retry", "suspend"],
    }
    status, page = call(f"{base}/runs/{quote(run_id)}")
    assert status == 200
    assert db_url.split("@")[0] not in page and "postgresql://" not in page
    (csrf,) = re.findall(r"&quot;csrf&quot;: &quot;([^&]+)&quot;", page)
    headers = {"Content-Type": "application/json", "X-CSRF-Token": csrf}

    status, refused = call(f"{api}/suspend", data={}, headers=headers)
    assert status == 403 and refused["error"]["code"] == "actions_disabled"
    assert get_run(kubectl, namespace, "watched")["spec"].get("suspend") is not True

    status, done = call(f"{api}/suspend", data={}, headers={**headers, "X-Action-Token": TOKEN})
    assert status == 200 and done["suspend"] is True

    def suspended() -> None:
        assert get_run(kubectl, namespace, "watched")["status"]["phase"] == "Suspended"
        deployment = get_deployment(kubectl, namespace, "watched-workers")
        assert deployment is not None and deployment["spec"]["replicas"] == 0

    wait_for(suspended, timeout=60)
    status, _ = call(f"{api}/resume", data={}, headers={**headers, "X-Action-Token": TOKEN})
    assert status == 200
    wait_for(lambda: get_run(kubectl, namespace, "watched")["status"]["phase"] != "Suspended")

    # Retry in the cluster is the operator's retry-failed annotation; it acts and removes it.
    status, asked = call(
        f"{api}/retry",
        data={"error_class": "permanent"},
        headers={**headers, "X-Action-Token": TOKEN},
    )
    assert status == 200 and asked == {**asked, "retried": None, "requested": "class=permanent"}

    def retried() -> None:
        run = get_run(kubectl, namespace, "watched")
        assert run["status"]["lastRetry"]["filter"] == "class=permanent", run["status"]
        assert "analysisq.io/retry-failed" not in (run["metadata"].get("annotations") or {})

    wait_for(retried, timeout=30)

    def provider_metrics() -> None:
        text = op.metrics()
        ok = re.search(
            r'analysisq_provider_items\{[^}]*outcome="ok"[^}]*run="watched"[^}]*\} (\d+)', text
        ) or re.search(
            r'analysisq_provider_items\{[^}]*run="watched"[^}]*outcome="ok"[^}]*\} (\d+)', text
        )
        assert ok and float(ok.group(1)) >= 5, [ln for ln in text.splitlines() if "provider" in ln]
        assert 'analysisq_provider_latency_seconds_count{namespace="' in text

    wait_for(provider_metrics, timeout=30)

"""Quotas on the real control plane: two operator-managed runs in two namespaces sharing one
rate pool, measured at the fake provider; and a budget that pauses a run until it is raised
by a patch (phase, condition, Event, the -o wide Cost column)."""

from __future__ import annotations

import json
import time

import pytest
from operator_env import (  # noqa: F401 (fixtures)
    FakeProviderProcess,
    FakeProviders,
    OperatorFactory,
    analysis_run,
    analysisrun_crd_fixture,
    apply,
    assert_exactly_once,
    condition,
    drop_namespace,
    events,
    fake_providers_fixture,
    get_run,
    make_namespace,
    operators_fixture,
    queue_counts,
    seed_prompts,
    wait_for,
)

from controlplane.fixtures import Kubectl

pytestmark = pytest.mark.cluster


def fake_target(
    provider: FakeProviderProcess, name: str = "fake", **kw: object
) -> dict[str, object]:
    return {"name": name, "provider": "openai", "model": "fake-model", "endpoint": provider.url,
            **kw}  # fmt: skip


def test_two_namespaces_share_one_pool(
    operators: OperatorFactory,
    namespace: str,
    kubectl: Kubectl,
    db_url: str,
    fake_providers: FakeProviders,
) -> None:
    """Two teams' runs on one key, 10 req/s: together never above 10 req/s + 10% in any
    10 s window at the provider (alone, each run could send 10 req/s)."""
    seed_prompts(db_url, 80, tag="a", prefix="a")
    seed_prompts(db_url, 80, tag="b", prefix="b")
    provider = fake_providers("--latency-ms", "20")
    other = make_namespace(kubectl, "t-quota-other")
    limit = {"requestsPerSecond": 10, "pool": "team-key"}
    try:
        operators([namespace, other])
        for ns, tag in ((namespace, "a"), (other, "b")):
            run = analysis_run("shared", workers=2, batchSize=5, prompts={"tags": [tag]},
                               targets=[fake_target(provider, rateLimit=limit)])  # fmt: skip
            apply(kubectl, ns, run)
        for ns in (namespace, other):
            kubectl("wait", "--for=condition=Complete", "analysisrun/shared", "--timeout=120s",
                    namespace=ns)  # fmt: skip
            status = get_run(kubectl, ns, "shared")["status"]
            assert status["counts"]["completed"] == 80
            assert status["usage"]["targets"][0]["pool"] == "team-key"
            assert_exactly_once(db_url, status["runId"], 80)
        stats = provider.stats()
        assert stats["completions"] == 160 and stats["prompts_completed_more_than_once"] == 0
        assert stats["elapsed_s"] >= 10
        assert stats["max_requests_10s"] <= 10 * 10 * 1.1, stats
    finally:
        drop_namespace(kubectl, other)


def wide_cost(kubectl: Kubectl, namespace: str, name: str) -> str:
    """The COST cell of ``-o wide``, cut at the header's column offsets: a cell that is empty
    (or holds spaces) must not shift the columns after it."""
    lines = kubectl("get", "analysisruns", "-o", "wide", namespace=namespace).stdout.splitlines()
    header = lines[0]
    start = header.index("COST")
    later = [header.index(h, start) for h in header[start:].split()[1:2]]
    end = later[0] if later else None
    for line in lines[1:]:
        if line.split()[0] == name:
            return line[start:end].strip()
    raise AssertionError(lines)


def test_a_budget_pauses_the_run_until_a_patch_raises_it(
    operators: OperatorFactory,
    namespace: str,
    kubectl: Kubectl,
    db_url: str,
    fake_providers: FakeProviders,
) -> None:
    seed_prompts(db_url, 30)  # 'analyse prompt pN': 5 tokens + max_tokens 95 = 100 each
    provider = fake_providers("--usage-factor", "1.0")
    operators([namespace])
    pricing = {"inputPerMillionTokens": 10_000, "outputPerMillionTokens": 10_000}
    target = fake_target(provider, pricing=pricing, params={"max_tokens": 95})
    run = analysis_run("priced", workers=2, batchSize=2, targets=[target],
                       budget={"maxCost": 10.5})  # fmt: skip
    started = time.time()
    apply(kubectl, namespace, run)

    def paused() -> dict[str, object]:
        status = get_run(kubectl, namespace, "priced").get("status") or {}
        assert status.get("phase") == "Paused", status.get("phase")
        return status

    status = wait_for(paused, timeout=90)
    cond = condition({"status": status}, "Paused")
    assert cond is not None and cond["status"] == "True" and cond["reason"] == "BudgetExhausted"
    assert "kubectl patch analysisrun" in cond["message"]
    run_id = str(status["runId"])
    wait_for(lambda: queue_counts(db_url, run_id).get("processing", 0) == 0, timeout=30)
    counts = queue_counts(db_url, run_id)
    assert counts.get("completed") == 10 and counts.get("pending") == 20, counts
    assert "failed" not in counts
    reasons = [e["reason"] for e in events(kubectl, namespace, "priced")]
    assert "BudgetExhausted" in reasons

    def cost_shown() -> str:
        cost = wide_cost(kubectl, namespace, "priced")
        assert cost == "10", (cost, get_run(kubectl, namespace, "priced").get("status"))
        return cost

    wait_for(cost_shown, timeout=30)

    kubectl("patch", "analysisrun", "priced", "--type=merge", "-p",
            json.dumps({"spec": {"budget": {"maxCost": 40}}}), namespace=namespace)  # fmt: skip
    kubectl("wait", "--for=condition=Complete", "analysisrun/priced", "--timeout=120s",
            namespace=namespace)  # fmt: skip
    status = get_run(kubectl, namespace, "priced")["status"]
    assert status["phase"] == "Succeeded" and status["counts"]["completed"] == 30
    assert status["usage"]["cost"] == 30 and status["usage"]["tokensIn"] == 150
    assert condition({"status": status}, "Paused")["status"] == "False"  # type: ignore[index]
    assert_exactly_once(db_url, run_id, 30)
    assert time.time() - started < 240

"""Target faults and bulk retry on the real control plane: a model typo pauses its target
and says which setting to fix; the retry-failed annotation runs a finished run again."""

from __future__ import annotations

import json

import pytest
from operator_env import (  # noqa: F401 (fixtures)
    FakeProviders,
    OperatorFactory,
    analysis_run,
    analysisrun_crd_fixture,
    apply,
    assert_exactly_once,
    condition,
    events,
    fake_providers_fixture,
    get_deployment,
    get_run,
    operators_fixture,
    queue_counts,
    seed_prompts,
    wait_complete,
    wait_for,
)

from controlplane.fixtures import Kubectl
from controlplane.podrunner import PodRunner

pytestmark = pytest.mark.cluster


def target(url: str, name: str, model: str) -> dict[str, str]:
    return {"name": name, "provider": "openai", "model": model, "endpoint": url}


def test_a_model_typo_pauses_its_target_and_names_the_setting_to_fix(
    operators: OperatorFactory,
    namespace: str,
    kubectl: Kubectl,
    pod_runner: PodRunner,
    db_url: str,
    fake_providers: FakeProviders,
) -> None:
    seed_prompts(db_url, 40)
    provider = fake_providers("--known-model", "fake-model", "--latency-ms", "20")
    operators([namespace])
    targets = [target(provider.url, "good", "fake-model"), target(provider.url, "gpt", "gpt-mok")]
    apply(kubectl, namespace, analysis_run("typo", workers=2, targets=targets))

    def paused() -> dict[str, object]:
        status = get_run(kubectl, namespace, "typo")["status"]
        assert status["pausedTargets"], status
        assert status["counts"]["completed"] == 40, status["counts"]
        return dict(status)

    status = wait_for(paused, timeout=90)
    (entry,) = status["pausedTargets"]  # type: ignore[misc]
    assert entry["name"] == "gpt" and "fix targets[gpt].model" in entry["reason"]
    assert "HTTP 404" in entry["reason"] and "model_not_found" in entry["reason"]
    degraded = condition({"status": status}, "Degraded")
    assert degraded is not None and degraded["reason"] == "TargetPaused"
    assert "fix targets[gpt].model" in degraded["message"]
    counts = queue_counts(db_url, str(status["runId"]))
    assert counts == {"completed": 40, "pending": 40}, counts  # no item of gpt burnt

    def paused_event() -> str:
        (note,) = [e for e in events(kubectl, namespace, "typo") if e["reason"] == "TargetPaused"]
        return str(note["message"])

    note = wait_for(paused_event, timeout=30)
    assert "fix targets[gpt].model" in note and "fix the setting named" in note
    assert "analysisq.io/resume-targets" in note

    # the fix: the right model, then the resume annotation
    fixed = json.dumps([{"op": "replace", "path": "/spec/targets/1/model", "value": "fake-model"}])
    kubectl("patch", "analysisrun", "typo", "--type=json", "-p", fixed, namespace=namespace)
    kubectl("annotate", "--overwrite", "analysisrun", "typo", "analysisq.io/resume-targets=1",
            namespace=namespace)  # fmt: skip
    wait_complete(kubectl, namespace, "typo")
    assert get_run(kubectl, namespace, "typo")["status"]["phase"] == "Succeeded"
    assert_exactly_once(db_url, str(status["runId"]), 80)


def test_the_retry_annotation_runs_a_finished_run_again(
    operators: OperatorFactory,
    namespace: str,
    kubectl: Kubectl,
    pod_runner: PodRunner,
    db_url: str,
    fake_providers: FakeProviders,
) -> None:
    seed_prompts(db_url, 60)
    provider = fake_providers("--error", "400=0.3", "--seed", "5")
    operators([namespace])
    apply(kubectl, namespace, analysis_run("again", workers=2,
                                           targets=[target(provider.url, "llm", "m")]))  # fmt: skip
    wait_complete(kubectl, namespace, "again")
    status = get_run(kubectl, namespace, "again")["status"]
    run_id = status["runId"]
    failed = status["counts"]["failed"]
    assert status["phase"] == "Failed" and 5 <= failed <= 35, status["counts"]

    def scaled_to(n: int) -> None:
        deployment = get_deployment(kubectl, namespace, "again-workers")
        assert deployment is not None and deployment["spec"]["replicas"] == n
        assert len(pod_runner.pids(namespace)) == n

    wait_for(lambda: scaled_to(0), timeout=60)

    # a bad filter is refused with an Event, and the annotation is taken away
    kubectl("annotate", "--overwrite", "analysisrun", "again",
            "analysisq.io/retry-failed=class=permament", namespace=namespace)  # fmt: skip

    def refused() -> None:
        notes = [e["message"] for e in events(kubectl, namespace, "again")
                 if e["reason"] == "RetryRefused"]  # fmt: skip
        assert notes and "unknown class 'permament'" in notes[0]
        annotations = get_run(kubectl, namespace, "again")["metadata"].get("annotations") or {}
        assert "analysisq.io/retry-failed" not in annotations

    wait_for(refused, timeout=30)

    provider.configure(errors={})  # the cause is fixed
    kubectl("annotate", "--overwrite", "analysisrun", "again",
            "analysisq.io/retry-failed=class=permanent", namespace=namespace)  # fmt: skip

    def running_again() -> None:
        run = get_run(kubectl, namespace, "again")
        assert run["status"]["lastRetry"]["count"] == failed, run["status"]
        assert run["status"]["lastRetry"]["filter"] == "class=permanent"
        assert "analysisq.io/retry-failed" not in (run["metadata"].get("annotations") or {})

    wait_for(running_again, timeout=30)
    wait_complete(kubectl, namespace, "again")
    final = get_run(kubectl, namespace, "again")["status"]
    assert final["phase"] == "Succeeded", final
    assert final["counts"]["completed"] == 60 and final["counts"]["failed"] == 0
    assert_exactly_once(db_url, run_id, 60)
    reasons = [e["reason"] for e in events(kubectl, namespace, "again")]
    assert {"Failed", "ItemsRetried", "Succeeded"} <= set(reasons)
    (retried,) = [e["message"] for e in events(kubectl, namespace, "again")
                  if e["reason"] == "ItemsRetried"]  # fmt: skip
    assert retried == (
        f"put {failed} failed items back in the queue (class=permanent); the run runs again "
        "with 2 workers"
    )
    wait_for(lambda: scaled_to(0), timeout=60)

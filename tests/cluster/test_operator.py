"""The operator on the real control plane: from `kubectl apply` to a complete run.

Real pieces only: kube-apiserver with the CRD from crds/, kube-controller-manager (the
Deployment and ReplicaSet controllers, garbage collection), the pod runner running the worker
pods as ``analysisq worker`` processes, a real PostgreSQL, the fake provider over HTTP, and the
operator as the ``analysisq operator`` process.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import pytest
from operator_env import (  # noqa: F401 (fixtures)
    ANALYSISQ,
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
    get_deployment,
    get_run,
    make_namespace,
    operators_fixture,
    queue_counts,
    seed_prompts,
    sql,
    wait_for,
)

from controlplane.fixtures import Kubectl
from controlplane.podrunner import PodRunner

pytestmark = pytest.mark.cluster


def fake_target(provider: FakeProviderProcess, name: str = "fake") -> dict[str, str]:
    return {"name": name, "provider": "openai", "model": "fake-model", "endpoint": provider.url}


def completed_column(kubectl: Kubectl, namespace: str, name: str) -> int | None:
    """The COMPLETED column of `kubectl get analysisruns` for one run."""
    lines = kubectl("get", "analysisruns", namespace=namespace).stdout.splitlines()
    header = lines[0].split()
    for line in lines[1:]:
        cells = line.split()
        if cells[0] == name and len(cells) == len(header):
            value = cells[header.index("COMPLETED")]
            return int(value) if value.isdigit() else None
    return None


def test_an_applied_run_is_filled_worked_to_completion_and_scaled_down(
    operators: OperatorFactory,
    namespace: str,
    kubectl: Kubectl,
    pod_runner: PodRunner,
    db_url: str,
    fake_providers: FakeProviders,
) -> None:
    seed_prompts(db_url, 300)
    provider = fake_providers("--latency-ms", "120", "--jitter-ms", "40")
    op = operators([namespace])
    run = analysis_run(
        "daily", workers=3, batchSize=4, leaseSeconds=10, targets=[fake_target(provider)]
    )
    applied = time.time()
    apply(kubectl, namespace, run)

    def scaled() -> None:
        deployment = get_deployment(kubectl, namespace, "daily-workers")
        assert deployment is not None and deployment["spec"]["replicas"] == 3
        assert len(pod_runner.pids(namespace)) == 3

    wait_for(scaled, timeout=30)
    run_id = get_run(kubectl, namespace, "daily")["status"]["runId"]
    assert run_id.startswith(f"{namespace}/daily/")

    def first_processed() -> float:
        (row,) = sql(
            db_url, "SELECT min(completed_at) AS t FROM analysis_queue WHERE run_id = $1", run_id
        )
        assert row["t"] is not None
        return float(row["t"].timestamp())

    first = wait_for(first_processed, timeout=30)

    seen_completed: list[int] = []
    while not (ready := condition(get_run(kubectl, namespace, "daily"), "Complete")) or (
        ready["status"] != "True"
    ):
        value = completed_column(kubectl, namespace, "daily")
        if value is not None and (not seen_completed or value != seen_completed[-1]):
            seen_completed.append(value)
        assert time.time() - applied < 120, "the run did not complete in time"
        time.sleep(0.3)
    kubectl("wait", "--for=condition=Complete", "analysisrun/daily", "--timeout=60s",
            namespace=namespace)  # fmt: skip
    waited = time.time()
    assert len(seen_completed) >= 3, f"kubectl showed no progress: {seen_completed}"
    assert seen_completed == sorted(seen_completed)

    status = get_run(kubectl, namespace, "daily")["status"]
    assert status["phase"] == "Succeeded"
    assert status["counts"]["total"] == status["counts"]["completed"] == 300
    assert status["progress"] == "100.0%"
    assert status["observedGeneration"] == 1
    assert status["startedAt"] <= status["finishedAt"]
    assert condition({"status": status}, "Filled")["status"] == "True"  # type: ignore[index]
    assert_exactly_once(db_url, run_id, 300)
    assert provider.stats()["prompts_completed"] == 300

    def scaled_down() -> None:
        deployment = get_deployment(kubectl, namespace, "daily-workers")
        assert deployment is not None and deployment["spec"]["replicas"] == 0
        assert pod_runner.pids(namespace) == {}

    wait_for(scaled_down, timeout=60)
    reasons = [e["reason"] for e in events(kubectl, namespace, "daily")]
    assert "Filled" in reasons and "Succeeded" in reasons
    wide = kubectl("get", "ar", "-o", "wide", namespace=namespace).stdout.splitlines()
    assert wide[0].split()[:9] == [
        "NAME", "PHASE", "TOTAL", "PENDING", "PROCESSING", "COMPLETED", "FAILED", "PROGRESS",
        "AGE",
    ]  # fmt: skip
    assert {"RETRYING", "STUCK", "WORKERS", "MESSAGE"} <= set(wide[0].split())
    assert wide[1].split()[:8] == ["daily", "Succeeded", "300", "0", "0", "300", "0", "100.0%"]
    metrics = op.metrics()
    assert (
        f'analysisq_run_items{{namespace="{namespace}",run="daily",status="completed"}} 300.0'
        in metrics
    )

    (row,) = sql(
        db_url, "SELECT max(completed_at) AS t FROM analysis_queue WHERE run_id = $1", run_id
    )
    last = row["t"].timestamp()
    rss = op.rss_bytes()
    print(
        f"\n[operator measurements] apply->first item processed: {first - applied:.2f} s;"
        f" last item -> Complete observed by kubectl: {waited - last:.2f} s"
        f" (reconcile interval 1.0 s); operator RSS: {rss / 2**20:.1f} MiB;"
        f" progress seen by kubectl: {seen_completed}"
    )
    assert rss < 150 * 2**20
    complete_at = datetime.strptime(
        condition({"status": status}, "Complete")["lastTransitionTime"],  # type: ignore[index]
        "%Y-%m-%dT%H:%M:%SZ",
    ).replace(tzinfo=UTC)
    assert complete_at.timestamp() - last < 5.0


def test_suspend_stops_the_workers_and_resume_finishes_the_run(
    operators: OperatorFactory,
    namespace: str,
    kubectl: Kubectl,
    pod_runner: PodRunner,
    db_url: str,
    fake_providers: FakeProviders,
) -> None:
    seed_prompts(db_url, 200)
    provider = fake_providers("--latency-ms", "200")
    operators([namespace])
    apply(
        kubectl,
        namespace,
        analysis_run("pausable", workers=2, batchSize=2, targets=[fake_target(provider)]),
    )
    run_id = wait_for(lambda: get_run(kubectl, namespace, "pausable")["status"]["runId"])
    wait_for(lambda: queue_counts(db_url, run_id).get("completed", 0) >= 20, timeout=60)

    # A setting the workers read restarts them (a new template); the run just carries on.
    template = wait_for(lambda: get_deployment(kubectl, namespace, "pausable-workers"))
    old_hash = template["spec"]["template"]["metadata"]["annotations"]["analysisq.io/config-hash"]
    kubectl("patch", "analysisrun", "pausable", "--type=merge", "-p", '{"spec":{"batchSize":3}}',
            namespace=namespace)  # fmt: skip

    def rolled() -> None:
        deployment = get_deployment(kubectl, namespace, "pausable-workers")
        assert deployment is not None
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["analysisq.io/config-hash"] != old_hash
        assert get_run(kubectl, namespace, "pausable")["status"]["observedGeneration"] == 2

    wait_for(rolled, timeout=30)
    (spec,) = sql(db_url, "SELECT spec->>'batchSize' AS b FROM analysis_runs WHERE id = $1", run_id)
    assert spec["b"] == "3"

    kubectl("patch", "analysisrun", "pausable", "--type=merge", "-p", '{"spec":{"suspend":true}}',
            namespace=namespace)  # fmt: skip

    def suspended() -> None:
        run = get_run(kubectl, namespace, "pausable")
        assert run["status"]["phase"] == "Suspended"
        deployment = get_deployment(kubectl, namespace, "pausable-workers")
        assert deployment is not None and deployment["spec"]["replicas"] == 0
        assert pod_runner.pids(namespace) == {}

    wait_for(suspended, timeout=60)
    frozen = queue_counts(db_url, run_id)
    assert frozen.get("processing", 0) == 0, frozen  # stopping workers released their claims
    time.sleep(3)
    assert queue_counts(db_url, run_id) == frozen
    assert 0 < frozen.get("completed", 0) < 200

    kubectl("patch", "analysisrun", "pausable", "--type=merge", "-p", '{"spec":{"suspend":false}}',
            namespace=namespace)  # fmt: skip
    wait_for(
        lambda: (
            get_run(kubectl, namespace, "pausable")["status"]["phase"] == "Running"
            or get_run(kubectl, namespace, "pausable")["status"]["phase"] == "Succeeded"
        ),
        timeout=30,
    )
    kubectl("wait", "--for=condition=Complete", "analysisrun/pausable", "--timeout=120s",
            namespace=namespace)  # fmt: skip
    assert_exactly_once(db_url, run_id, 200)
    reasons = [e["reason"] for e in events(kubectl, namespace, "pausable")]
    assert "Suspended" in reasons and "Resumed" in reasons


def test_runs_side_by_side_in_one_namespace_and_across_namespaces(
    operators: OperatorFactory,
    namespace: str,
    kubectl: Kubectl,
    db_url: str,
) -> None:
    seed_prompts(db_url, 120, tag="a", prefix="a")
    seed_prompts(db_url, 50, tag="b", prefix="b")
    other = make_namespace(kubectl, "t-operator-other")
    try:
        operators([namespace, other])
        two_targets = [
            {"name": "echo-one", "provider": "echo", "model": "e1"},
            {"name": "echo-two", "provider": "echo", "model": "e2"},
        ]
        apply(kubectl, namespace, analysis_run("alpha", workers=2, prompts={"tags": ["a"]}))
        apply(
            kubectl,
            namespace,
            analysis_run("beta", workers=1, prompts={"tags": ["b"]}, targets=two_targets),
        )
        apply(kubectl, other, analysis_run("alpha", workers=2, prompts={"tags": ["a"]}))
        expected = {(namespace, "alpha"): 120, (namespace, "beta"): 100, (other, "alpha"): 120}
        run_ids = set()
        for (ns, name), items in expected.items():
            kubectl("wait", "--for=condition=Complete", f"analysisrun/{name}",
                    "--timeout=120s", namespace=ns)  # fmt: skip
            status = get_run(kubectl, ns, name)["status"]
            assert status["counts"]["total"] == status["counts"]["completed"] == items
            assert_exactly_once(db_url, status["runId"], items)
            run_ids.add(status["runId"])
            assert get_deployment(kubectl, ns, f"{name}-workers") is not None
        assert len(run_ids) == 3
    finally:
        drop_namespace(kubectl, other)


def test_deleting_runs_removes_their_workers_and_rows_per_on_delete(
    operators: OperatorFactory,
    namespace: str,
    kubectl: Kubectl,
    pod_runner: PodRunner,
    db_url: str,
    fake_providers: FakeProviders,
) -> None:
    seed_prompts(db_url, 60)
    provider = fake_providers("--latency-ms", "500")
    operators([namespace])
    apply(kubectl, namespace, analysis_run("kept", workers=1, onDelete="Keep"))
    apply(
        kubectl,
        namespace,
        analysis_run(
            "dropped", workers=2, batchSize=1, onDelete="Delete", targets=[fake_target(provider)]
        ),
    )
    kubectl("wait", "--for=condition=Complete", "analysisrun/kept", "--timeout=60s",
            namespace=namespace)  # fmt: skip
    kept_id = get_run(kubectl, namespace, "kept")["status"]["runId"]
    dropped_id = get_run(kubectl, namespace, "dropped")["status"]["runId"]
    wait_for(lambda: len(pod_runner.pids(namespace)) == 2, timeout=30)
    # Only a run whose rows go away on delete keeps a finalizer once it is finished.
    finalizers = get_run(kubectl, namespace, "kept")["metadata"].get("finalizers") or []
    assert finalizers == []
    assert (
        "analysisq.io/finalizer" in get_run(kubectl, namespace, "dropped")["metadata"]["finalizers"]
    )

    kubectl("delete", "analysisrun", "kept", "dropped", "--timeout=60s", namespace=namespace)

    def gone() -> None:
        for name in ("kept", "dropped"):
            assert get_deployment(kubectl, namespace, f"{name}-workers") is None
        assert pod_runner.pids(namespace) == {}

    wait_for(gone, timeout=60)  # garbage collection by kube-controller-manager
    assert sum(queue_counts(db_url, kept_id).values()) == 60
    assert queue_counts(db_url, dropped_id) == {}
    assert sql(db_url, "SELECT id FROM analysis_runs WHERE id = $1", dropped_id) == []
    assert (
        sql(db_url, "SELECT count(*) FROM analysis_results WHERE run_id = $1", dropped_id)[0][0]
        == 0
    )


def test_the_operator_refuses_to_run_on_a_schema_it_does_not_know(
    db_url: str, tmp_path: Path
) -> None:
    sql(
        db_url,
        "INSERT INTO analysisq_migrations (version, name, checksum) VALUES (999, 'future', 'x')",
    )
    result = subprocess.run(
        [ANALYSISQ, "operator", "--health-port", "0", "--metrics-port", "0"],
        env={"PATH": os.environ["PATH"], "HOME": str(tmp_path), "DATABASE_URL": db_url},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    assert "schema migrations [999] that this analysisq does not know" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_batch_run_shows_its_provider_batches_and_completes(
    operators: OperatorFactory,
    namespace: str,
    kubectl: Kubectl,
    pod_runner: PodRunner,
    db_url: str,
    fake_providers: FakeProviders,
) -> None:
    seed_prompts(db_url, 200)
    provider = fake_providers("--batch-seconds", "8")
    operators([namespace])
    target = {**fake_target(provider), "mode": "batch", "batch": {"pollSeconds": 0.5}}
    apply(kubectl, namespace, analysis_run("nightly", workers=2, leaseSeconds=10, targets=[target]))

    def waiting_in_a_batch() -> list[str]:
        batches = get_run(kubectl, namespace, "nightly")["status"].get("batches") or {}
        assert batches.get("items") == 200 and batches.get("openCount", 0) >= 1, batches
        assert all(b["providerBatchId"].startswith("batch_") for b in batches["open"]), batches
        lines = kubectl("get", "ar", "-o", "wide", namespace=namespace).stdout.splitlines()
        header, row = lines[0].split(), lines[1].split()
        assert "INBATCHES" in header and "BATCHES" in header
        return row

    row = wait_for(waiting_in_a_batch, timeout=60)
    assert row[1] == "Running" and row[4] == "200"  # processing: inside the provider batch
    kubectl("wait", "--for=condition=Complete", "analysisrun/nightly", "--timeout=120s",
            namespace=namespace)  # fmt: skip
    status = get_run(kubectl, namespace, "nightly")["status"]
    assert status["phase"] == "Succeeded" and status["counts"]["completed"] == 200
    assert status["batches"]["items"] == 0 and status["batches"]["answeredByBatch"] == "100.0%"
    run_id = status["runId"]
    assert_exactly_once(db_url, run_id, 200)
    stats = provider.stats()
    assert stats["requests"] == 0 and stats["batch_requests"] == 200
    assert stats["prompts_completed_more_than_once"] == 0


def test_deleting_a_batch_run_cancels_its_open_batches_and_ingests_partial_results(
    operators: OperatorFactory,
    namespace: str,
    kubectl: Kubectl,
    pod_runner: PodRunner,
    db_url: str,
    fake_providers: FakeProviders,
) -> None:
    seed_prompts(db_url, 100)
    provider = fake_providers("--batch-seconds", "30")
    operators([namespace])
    target = {**fake_target(provider), "mode": "batch", "batch": {"pollSeconds": 0.5}}
    for name, on_delete in (("kept", "Keep"), ("dropped", "Delete")):
        run = analysis_run(name, workers=1, leaseSeconds=30, onDelete=on_delete, targets=[target])
        apply(kubectl, namespace, run)

    def in_flight() -> dict[str, str]:
        ids = {}
        for name in ("kept", "dropped"):
            status = get_run(kubectl, namespace, name)["status"]
            (batch,) = (status.get("batches") or {}).get("open") or [{}]
            assert batch.get("providerBatchId"), status
            ids[status["runId"]] = batch["providerBatchId"]
        return ids

    batch_ids = wait_for(in_flight, timeout=90)
    time.sleep(4)  # part of each batch is answered
    kubectl("delete", "analysisrun", "kept", "dropped", "--timeout=90s", namespace=namespace)
    wait_for(lambda: pod_runner.pids(namespace) == {}, timeout=60)
    kept_id, dropped_id = batch_ids
    for batch_id in batch_ids.values():
        seen = provider_batch(provider, batch_id)
        assert seen["status"] == "cancelled", seen
    # Keep: the partial results were ingested and the rest went back unspent, nothing open.
    counts = queue_counts(db_url, kept_id)
    assert 0 < counts.get("completed", 0) < 100 and counts.get("processing", 0) == 0, counts
    assert counts["completed"] + counts["pending"] == 100
    (outcome,) = sql(db_url, "SELECT state, outcome FROM batch_submissions WHERE run_id = $1",
                     kept_id)  # fmt: skip
    assert outcome["state"] == "done" and outcome["outcome"].startswith("cancelled:"), outcome
    # Delete: the rows went only after the batch was closed.
    assert sql(db_url, "SELECT id FROM analysis_runs WHERE id = $1", dropped_id) == []
    (row,) = sql(db_url, "SELECT count(*) AS n, count(DISTINCT queue_id) AS d FROM"
                 " analysis_results WHERE run_id = $1", kept_id)  # fmt: skip
    assert row["n"] == row["d"] == counts["completed"]
    # Both runs answer the same prompts: the provider's per-prompt count cannot tell here.
    assert provider.stats()["batches_created"] == 2


def provider_batch(provider: FakeProviderProcess, batch_id: str) -> dict[str, object]:
    with urllib.request.urlopen(f"{provider.url}/batches/{batch_id}", timeout=10) as response:
        body: dict[str, object] = json.loads(response.read())
    return body

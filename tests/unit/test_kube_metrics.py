"""Prometheus metrics of the operator: per-run gauges follow the status, deletion drops them."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest

from analysisq.kube.metrics import Metrics
from analysisq.kube.ref import RunRef
from analysisq.kube.rollout import old_pods_gone, rolled_out

pytestmark = pytest.mark.unit

REF = RunRef("ns", "daily", "uid")


def text(metrics: Metrics) -> str:
    return generate_latest(metrics.registry).decode()


def test_run_gauges_follow_the_status_and_vanish_with_the_run() -> None:
    metrics = Metrics()
    status = {
        "phase": "Running",
        "counts": {"total": 10, "pending": 4, "completed": 5, "failed": 1, "stuck": 2},
        "workers": {"desired": 3, "ready": 2},
        "throughput": "2.5/s",
        "batches": {"items": 7, "openCount": 2, "answeredByBatch": "0.0%", "open": []},
    }
    metrics.observe(REF, status, deadline=1_700_000_000.0, throughput=2.5)
    out = text(metrics)
    assert 'analysisq_run_provider_batches{kind="items",namespace="ns",run="daily"} 7.0' in out
    assert 'analysisq_run_provider_batches{kind="open",namespace="ns",run="daily"} 2.0' in out
    assert 'analysisq_run_items{namespace="ns",run="daily",status="stuck"} 2.0' in out
    assert 'analysisq_run_workers{namespace="ns",run="daily",state="ready"} 2.0' in out
    assert 'analysisq_run_progress_ratio{namespace="ns",run="daily"} 0.6' in out
    assert 'analysisq_run_throughput_items_per_second{namespace="ns",run="daily"} 2.5' in out
    assert 'analysisq_run_phase{namespace="ns",phase="Running",run="daily"} 1.0' in out
    assert 'analysisq_run_deadline_timestamp_seconds{namespace="ns",run="daily"} 1.7e+09' in out
    metrics.observe(
        REF, {**status, "phase": "Succeeded"}, deadline=1_700_000_000.0, throughput=None
    )
    assert "analysisq_run_deadline_timestamp_seconds{" not in text(metrics)
    metrics.reconcile_errors.labels("DatabaseUnavailable").inc()
    metrics.forget(REF)
    out = text(metrics)
    assert 'run="daily"' not in out
    assert 'analysisq_reconcile_errors_total{reason="DatabaseUnavailable"} 1.0' in out


def test_a_rollout_is_done_when_only_current_pods_remain() -> None:
    def deployment(replicas: int, updated: int, total: int, observed: int = 2) -> dict[str, object]:
        return {
            "metadata": {"generation": 2},
            "spec": {"replicas": replicas},
            "status": {"observedGeneration": observed, "updatedReplicas": updated,
                       "replicas": total},
        }  # fmt: skip

    assert rolled_out(deployment(2, 2, 2))
    assert not rolled_out(deployment(2, 1, 3))  # an old pod still runs
    assert not rolled_out(deployment(2, 2, 2, observed=1))  # the controller has not seen it
    assert not rolled_out(None)
    assert rolled_out({"metadata": {"generation": 1}, "spec": {"replicas": 0}, "status": {
        "observedGeneration": 1}})  # fmt: skip


def test_a_resume_waits_until_the_old_pods_finished_terminating() -> None:
    """rolled_out ignores deleted pods that still drain with the old key; resuming then let a
    late 401 from one of them pause the target again."""
    done = {
        "metadata": {"generation": 2},
        "spec": {"replicas": 2, "template": {"spec": {"terminationGracePeriodSeconds": 30}}},
        "status": {"observedGeneration": 2, "updatedReplicas": 2, "replicas": 2},
    }
    assert rolled_out(done)
    assert not old_pods_gone(done, rolled_out_at=100.0, now=100.0)
    assert not old_pods_gone(done, rolled_out_at=100.0, now=129.0)
    assert old_pods_gone(done, rolled_out_at=100.0, now=130.5)
    # where the API counts terminating pods, that count decides at once
    draining = {**done, "status": {**done["status"], "terminatingReplicas": 1}}
    assert not old_pods_gone(draining, rolled_out_at=0.0, now=1e9)
    drained = {**done, "status": {**done["status"], "terminatingReplicas": 0}}
    assert old_pods_gone(drained, rolled_out_at=100.0, now=100.0)

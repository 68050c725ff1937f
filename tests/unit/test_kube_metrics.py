"""Prometheus metrics of the operator: per-run gauges follow the status, deletion drops them."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest

from analysisq.kube.metrics import Metrics
from analysisq.kube.ref import RunRef

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

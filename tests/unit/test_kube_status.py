"""Status rules: phases, conditions, printer text, patch-only-when-changed, and the Events."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from analysisq.errors import (
    DatabaseUnavailable,
    Deadlock,
    KubeApiError,
    SchemaMismatch,
    SecretMissing,
    SerializationFailure,
    SpecError,
)
from analysisq.kube.handlers import _changed_fields, backoff
from analysisq.kube.report import degraded_report, problem_of, transition_notes
from analysisq.kube.startup import kopf_settings, namespaces
from analysisq.kube.status import (
    Observation,
    PausedTarget,
    Problem,
    changed,
    eta_text,
    get_condition,
    is_true,
    reconciled,
    set_condition,
)
from analysisq.queue.states import Counts
from analysisq.settings import Settings
from analysisq.spec import parse_spec

pytestmark = pytest.mark.unit

T0 = datetime(2025, 1, 1, 2, 0, tzinfo=UTC)


def spec(**kw: Any) -> Any:
    return parse_spec({"targets": [{"name": "a", "provider": "echo", "model": "m"}], **kw})


def filled() -> dict[str, Any]:
    return {
        "phase": "Running",
        "conditions": set_condition([], "Filled", True, "Filled", "100 items queued", now=T0),
    }


def seen(counts: Counts, **kw: Any) -> Observation:
    return Observation(
        counts=counts, desired=kw.pop("desired", 3), ready=kw.pop("ready", 3), now=T0, **kw
    )


def test_a_condition_keeps_its_transition_time_until_it_flips() -> None:
    first = set_condition([], "Ready", False, "WorkersNotReady", "0 of 3", now=T0)
    later = T0 + timedelta(minutes=5)
    same = set_condition(first, "Ready", False, "WorkersNotReady", "1 of 3", now=later)
    assert same[0]["lastTransitionTime"] == "2025-01-01T02:00:00Z"
    assert same[0]["message"] == "1 of 3"
    flipped = set_condition(same, "Ready", True, "WorkersReady", "3 of 3", now=later)
    assert flipped[0]["lastTransitionTime"] == "2025-01-01T02:05:00Z"


def test_a_running_run_reports_counts_progress_and_workers() -> None:
    counts = Counts(
        total=100, pending=40, processing=10, completed=45, failed_for_good=1, retrying=4
    )
    new = reconciled(filled(), spec(), seen(counts, ready=2, throughput=5.0))
    assert new["phase"] == "Running"
    assert new["counts"]["completed"] == 45
    assert new["progress"] == "46.0%"
    assert new["workers"] == {"desired": 3, "ready": 2}
    assert new["throughput"] == "5.0/s"
    assert new["eta"] == "10s"
    ready = get_condition(new, "Ready")
    assert ready is not None and ready["status"] == "False"
    assert ready["reason"] == "WorkersNotReady"
    assert not is_true(new, "Complete")
    assert is_true(new, "Filled")


def test_every_item_terminal_is_success_within_the_failure_ratio() -> None:
    counts = Counts(total=1000, completed=995, failed_for_good=5)
    new = reconciled(filled(), spec(maxFailedRatio=0.01), seen(counts))
    assert new["phase"] == "Succeeded"
    assert is_true(new, "Complete") and not is_true(new, "Failed")
    assert new["finishedAt"] == "2025-01-01T02:00:00Z"
    assert new["throughput"] is None and new["eta"] is None


def test_too_many_failures_is_a_failed_run_that_is_still_complete() -> None:
    counts = Counts(total=100, completed=90, failed_for_good=10)
    new = reconciled(filled(), spec(maxFailedRatio=0.05), seen(counts))
    assert new["phase"] == "Failed"
    complete = get_condition(new, "Complete")
    assert complete is not None and complete["status"] == "True"
    assert complete["reason"] == "TooManyFailures"
    failed = get_condition(new, "Failed")
    assert failed is not None and failed["status"] == "True"
    assert "10 of 100" in failed["message"]


def test_suspended_paused_and_late_runs_say_so() -> None:
    counts = Counts(total=10, pending=10)
    new = reconciled(filled(), spec(suspend=True), seen(counts, desired=0, ready=0))
    assert new["phase"] == "Suspended"
    paused = [PausedTarget("a", "HTTP 401: invalid key", T0)]
    late = spec(deadline=(T0 - timedelta(hours=1)).isoformat())
    new = reconciled(filled(), late, seen(counts, paused=paused))
    degraded = get_condition(new, "Degraded")
    assert degraded is not None and degraded["status"] == "True"
    assert degraded["reason"] == "TargetPaused"
    assert "DeadlineExceeded" not in degraded["reason"]
    assert "deadline 2025-01-01T01:00:00Z passed" in degraded["message"]
    assert new["pausedTargets"] == [
        {"name": "a", "reason": "HTTP 401: invalid key", "since": "2025-01-01T02:00:00Z"}
    ]


def test_an_unchanged_run_needs_no_patch() -> None:
    counts = Counts(total=100, pending=50, completed=50)
    first = reconciled(filled(), spec(), seen(counts))
    status = {**filled(), **first}
    again = reconciled(status, spec(), seen(counts))
    assert changed(status, again) == {}
    moved = reconciled(status, spec(), seen(Counts(total=100, pending=49, completed=51)))
    assert set(changed(status, moved)) == {"counts", "progress"}


def test_eta_is_coarse_so_status_does_not_churn() -> None:
    assert eta_text(3) == "5s"
    assert eta_text(62) == "60s"
    assert eta_text(601) == "10m"
    assert eta_text(3 * 3600 + 5 * 60) == "3h05m"


def test_problems_name_their_reason_and_warn_once() -> None:
    assert problem_of(DatabaseUnavailable("down")).reason == "DatabaseUnavailable"
    # a conflict between transactions is retried like an outage but reported as itself
    assert problem_of(Deadlock("x")).reason == "Deadlock" and Deadlock.retryable
    assert problem_of(SerializationFailure("x")).reason == "SerializationFailure"
    assert SerializationFailure.retryable
    assert problem_of(SchemaMismatch()).reason == "SchemaMismatch"
    assert problem_of(SecretMissing("gone")).reason == "SecretMissing"
    assert problem_of(KubeApiError("503")).reason == "KubernetesApiError"
    assert problem_of(SpecError("bad")).reason == "InvalidSpec"
    first = degraded_report({}, Problem("SecretMissing", "secret x not found"))
    assert first.status["phase"] == "Pending"
    assert [n.reason for n in first.notes] == ["SecretMissing"]
    again = degraded_report(first.status, Problem("SecretMissing", "secret x not found"))
    assert again.notes == [] and again.status == {}
    other = degraded_report(first.status, Problem("DatabaseUnavailable", "down"))
    assert [n.reason for n in other.notes] == ["DatabaseUnavailable"]


def test_a_newly_paused_target_is_an_event() -> None:
    paused = [PausedTarget("a", "401", T0)]
    counts = Counts(total=10, pending=10)
    new = reconciled(filled(), spec(), seen(counts, paused=paused))
    notes = transition_notes(filled(), new, paused)
    assert [n.reason for n in notes] == ["TargetPaused"]
    assert transition_notes({**filled(), **new}, new, paused) == []


def test_scale_only_changes_are_told_apart() -> None:
    assert _changed_fields([("change", ("workers",), 1, 2)]) == {"workers"}
    assert _changed_fields([("change", ("spec", "suspend"), False, True)]) == {"suspend"}
    assert _changed_fields([("change", ("batchSize",), 5, 6), ("change", ("workers",), 1, 2)]) == {
        "batchSize",
        "workers",
    }
    assert [backoff(r) for r in range(8)] == [2, 4, 8, 16, 32, 60, 60, 60]


def test_kopf_is_configured_under_analysisq_io_and_standalone() -> None:
    ks = kopf_settings(Settings(watch_server_timeout=120, watch_client_timeout=150))
    assert ks.persistence.finalizer == "analysisq.io/finalizer"
    # A sub-domain: kopf ignores changes to annotations under its own storage prefix.
    assert ks.persistence.progress_storage.prefix == "operator.analysisq.io"
    assert ks.persistence.diffbase_storage.prefix == "operator.analysisq.io"
    assert ks.watching.server_timeout == 120
    assert ks.watching.client_timeout == 150
    assert ks.peering.standalone is True
    assert namespaces(Settings(namespaces=" a, b ,,")) == ["a", "b"]
    assert namespaces(Settings()) == []


def test_open_provider_batches_are_in_the_status() -> None:
    from analysisq.kube.status import BatchView
    from analysisq.queue.batches import BatchSummary, OpenBatch

    open_ = [
        OpenBatch(7, "cheap", "submitted", "batch_abc", "in_progress", 50_000,
                  {"total": 50_000, "completed": 120}, T0 - timedelta(minutes=42), T0, None, "w1"),
        OpenBatch(8, "cheap", "intent", None, None, 20_000, {}, T0, None, None, "w2"),
    ]  # fmt: skip
    view = BatchView(BatchSummary(70_000, 2, 30_000, 40_000), open_)
    counts = Counts(total=100_000, processing=70_000, completed=30_000)
    new = reconciled(filled(), spec(), seen(counts, batches=view))
    batches = new["batches"]
    assert batches["items"] == 70_000 and batches["openCount"] == 2
    assert batches["answeredByBatch"] == "75.0%"
    first, second = batches["open"]
    assert first["providerBatchId"] == "batch_abc" and first["age"] == "42m"
    assert first["requestCounts"] == {"total": 50_000, "completed": 120}
    assert "providerBatchId" not in second and second["providerStatus"] == "intent"
    assert reconciled(filled(), spec(), seen(counts))["batches"] is None

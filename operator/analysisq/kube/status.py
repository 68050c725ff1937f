"""What an AnalysisRun's status says: phase, conditions, counts and the printer-column text.

Pure functions over plain dicts (the status as the API holds it), so the rules are unit tested
without a cluster. The service observes (database counts, Deployment replicas, paused
targets, problems met) and this module decides; ``changed`` keeps only what differs, so the
operator patches status only when something a reader would see changed.

Conditions (``kubectl wait --for=condition=Complete`` works):

- ``Filled``: the queue holds every item of the run.
- ``Ready``: the desired workers are running (False while starting, suspended, finished or
  with ``workers: 0``).
- ``Complete``: every item is terminal (completed or failed for good); True for a failed run
  too, so that waiting on it always ends. ``Failed`` then says which way it went.
- ``Failed``: more items failed for good than ``maxFailedRatio`` allows.
- ``Paused``: True with reason ``BudgetExhausted`` when the next request could exceed
  ``spec.budget`` (phase ``Paused``; every item kept); raising the budget lifts it.
- ``Degraded``: something needs a person: ``DatabaseUnavailable`` (``Deadlock`` and
  ``SerializationFailure``: a conflict, cleared by the next reconcile), ``SchemaMismatch``,
  ``SecretMissing``, ``TargetPaused``, ``DeadlineExceeded``, ``InvalidSpec``, ``WorkersFailing``
  (a worker pod cannot pull its image, start or stay up: see ``podhealth``),
  ``KubernetesApiError``. The run keeps its items; the operator retries with backoff.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from analysisq.queue.batches import BatchSummary, OpenBatch
from analysisq.queue.budget import BudgetState
from analysisq.queue.states import Counts
from analysisq.queue.usage import RunUsage, TargetUsage
from analysisq.spec import AnalysisRunSpec

PENDING, FILLING, RUNNING, SUSPENDED = "Pending", "Filling", "Running", "Suspended"
PAUSED, SUCCEEDED, FAILED = "Paused", "Succeeded", "Failed"
FINISHED = frozenset({SUCCEEDED, FAILED})
PHASES = (PENDING, FILLING, RUNNING, SUSPENDED, PAUSED, SUCCEEDED, FAILED)

FILLED, READY, COMPLETE, FAILED_CONDITION, DEGRADED, PAUSED_CONDITION = (
    "Filled",
    "Ready",
    "Complete",
    "Failed",
    "Degraded",
    "Paused",
)
BUDGET_EXHAUSTED = "BudgetExhausted"


def timestamp(at: datetime | None = None) -> str:
    """RFC 3339 in UTC, to the second, as Kubernetes writes times."""
    return (at or datetime.now(UTC)).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Problem:
    """Why the run is degraded: a condition reason and a message for people (no secrets)."""

    reason: str
    message: str


@dataclass(frozen=True)
class PausedTarget:
    name: str
    reason: str
    since: datetime | None
    #: Paused by the circuit breaker (a wrong model or endpoint), not by a refused key.
    by_fault: bool = False


@dataclass(frozen=True)
class BatchView:
    """The run's provider batches (targets in mode batch), as the queue reports them."""

    summary: BatchSummary
    open: Sequence[OpenBatch] = ()


@dataclass(frozen=True)
class Observation:
    """What one reconciliation saw."""

    counts: Counts
    desired: int
    ready: int
    paused: Sequence[PausedTarget] = ()
    throughput: float | None = None
    problems: Sequence[Problem] = ()
    now: datetime = field(default_factory=lambda: datetime.now(UTC))
    #: Tokens and cost of the stored answers.
    usage: RunUsage | None = None
    #: The run's budget and spending; None without a budget.
    budget: BudgetState | None = None
    batches: BatchView | None = None


# --- conditions ----------------------------------------------------------------------------


def get_condition(status: Mapping[str, Any], kind: str) -> Mapping[str, Any] | None:
    for cond in status.get("conditions") or []:
        if cond.get("type") == kind:
            return dict(cond)
    return None


def is_true(status: Mapping[str, Any], kind: str) -> bool:
    cond = get_condition(status, kind)
    return cond is not None and cond.get("status") == "True"


def set_condition(
    conditions: Sequence[Mapping[str, Any]],
    kind: str,
    value: bool,
    reason: str,
    message: str,
    *,
    now: datetime | None = None,
    generation: int | None = None,
) -> list[dict[str, Any]]:
    """A new conditions list with *kind* set; its transition time moves only if it flipped."""
    status = "True" if value else "False"
    out: list[dict[str, Any]] = []
    found = False
    for cond in conditions:
        if cond.get("type") != kind:
            out.append(dict(cond))
            continue
        found = True
        updated = dict(cond, status=status, reason=reason, message=message)
        if cond.get("status") != status:
            updated["lastTransitionTime"] = timestamp(now)
        if generation is not None:
            updated["observedGeneration"] = generation
        out.append(updated)
    if not found:
        new: dict[str, Any] = {
            "type": kind,
            "status": status,
            "reason": reason,
            "message": message,
            "lastTransitionTime": timestamp(now),
        }
        if generation is not None:
            new["observedGeneration"] = generation
        out.append(new)
    return out


def degraded(
    conditions: Sequence[Mapping[str, Any]],
    problems: Sequence[Problem],
    *,
    now: datetime | None = None,
) -> list[dict[str, Any]]:
    """Set ``Degraded`` from the problems seen (the first gives the reason)."""
    if problems:
        message = "; ".join(p.message for p in problems)
        return set_condition(conditions, DEGRADED, True, problems[0].reason, message, now=now)
    return set_condition(conditions, DEGRADED, False, "Healthy", "no problem seen", now=now)


# --- verdict and text ----------------------------------------------------------------------


def verdict(counts: Counts, spec: AnalysisRunSpec) -> str | None:
    """``Succeeded`` / ``Failed`` once every item is terminal, else None."""
    if not counts.done:
        return None
    if counts.failed_too_often(spec.max_failed_ratio):
        return FAILED
    return SUCCEEDED


def progress_text(counts: Counts) -> str:
    return f"{100 * counts.progress:.1f}%"


def throughput_text(rate: float) -> str:
    return f"{rate:.1f}/s"


def eta_text(seconds: float) -> str:
    """A short, coarse duration; coarse so the status does not change on every tick."""
    s = int(seconds)
    if s < 90:
        return f"{max(5, 5 * round(s / 5))}s"
    if s < 3600:
        return f"{round(s / 60)}m"
    hours, minutes = divmod(round(s / 60), 60)
    return f"{hours}h{minutes:02d}m"


def summary(counts: Counts) -> str:
    return (
        f"{counts.total} items: {counts.completed} completed, "
        f"{counts.failed_for_good} failed for good"
        + (f", {counts.retrying} retrying" if counts.retrying else "")
    )


# --- the reconciled status -----------------------------------------------------------------


def reconciled(old: Mapping[str, Any], spec: AnalysisRunSpec, seen: Observation) -> dict[str, Any]:
    """Every status field the reconcile timer owns, computed from what it saw."""
    counts = seen.counts
    outcome = verdict(counts, spec)
    problems = list(seen.problems)
    for target in seen.paused:
        problems.append(Problem("TargetPaused", f"target {target.name} paused: {target.reason}"))
    if spec.deadline and seen.now > spec.deadline and outcome is None:
        problems.append(Problem("DeadlineExceeded", f"deadline {timestamp(spec.deadline)} passed"))

    conditions: list[dict[str, Any]] = list(old.get("conditions") or [])
    now = seen.now
    if outcome is not None:
        phase = outcome
        conditions = set_condition(
            conditions,
            READY,
            False,
            "Finished",
            "the run is finished; its workers are scaled to 0",
            now=now,
        )
    elif spec.suspend:
        phase = SUSPENDED
        conditions = set_condition(
            conditions, READY, False, "Suspended", "spec.suspend is true", now=now
        )
    elif seen.budget is not None and seen.budget.exhausted:
        phase = PAUSED
        conditions = set_condition(
            conditions, READY, False, BUDGET_EXHAUSTED, "the run is paused for its budget", now=now
        )
    elif seen.desired == 0:
        phase = RUNNING
        conditions = set_condition(
            conditions, READY, False, "NoWorkers", "spec.workers is 0", now=now
        )
    else:
        phase = RUNNING
        ok = seen.ready >= seen.desired
        conditions = set_condition(
            conditions,
            READY,
            ok,
            "WorkersReady" if ok else "WorkersNotReady",
            f"{seen.ready} of {seen.desired} workers ready",
            now=now,
        )
    if outcome is not None:
        reason = "Succeeded" if outcome == SUCCEEDED else "TooManyFailures"
        conditions = set_condition(conditions, COMPLETE, True, reason, summary(counts), now=now)
    else:
        conditions = set_condition(
            conditions, COMPLETE, False, "ItemsRemaining", "items remain to be processed", now=now
        )
    if outcome == FAILED:
        conditions = set_condition(
            conditions,
            FAILED_CONDITION,
            True,
            "TooManyFailures",
            f"{counts.failed_for_good} of {counts.total} items failed for good "
            f"({counts.failed_ratio:.1%}), "
            f"more than maxFailedRatio {spec.max_failed_ratio:.1%}",
            now=now,
        )
    else:
        conditions = set_condition(
            conditions, FAILED_CONDITION, False, "WithinLimits", "failures within limits", now=now
        )
    exhausted = phase == PAUSED and seen.budget is not None
    conditions = set_condition(
        conditions,
        PAUSED_CONDITION,
        exhausted,
        BUDGET_EXHAUSTED if exhausted else "NotPaused",
        budget_message(seen.budget) if seen.budget and exhausted else "the run is not paused",
        now=now,
    )
    conditions = degraded(conditions, problems, now=now)

    rate = seen.throughput
    remaining = counts.total - counts.terminal
    status: dict[str, Any] = {
        "phase": phase,
        "counts": counts.as_dict(),
        "progress": progress_text(counts),
        "workers": {"desired": seen.desired, "ready": seen.ready},
        "throughput": throughput_text(rate) if rate is not None and outcome is None else None,
        "eta": eta_text(remaining / rate) if rate and remaining and outcome is None else None,
        "pausedTargets": [
            {"name": t.name, "reason": t.reason[:1024]}
            | ({"since": timestamp(t.since)} if t.since else {})
            for t in seen.paused
        ]
        or None,
        "conditions": conditions,
        "message": _message(phase, counts, problems, seen),
        "usage": usage_status(seen.usage, seen.budget) if seen.usage is not None else None,
        "batches": batches_status(seen.batches, now) if seen.batches else None,
    }
    if outcome is not None:
        status["finishedAt"] = old.get("finishedAt") or timestamp(now)
    return status


def budget_message(budget: BudgetState) -> str:
    return (
        f"budget exhausted ({budget.describe()}): no item was lost; raise spec.budget to "
        "continue, e.g. kubectl patch analysisrun NAME --type merge "
        """-p '{"spec":{"budget":{"maxCost":N}}}'"""
    )


def usage_status(usage: RunUsage, budget: BudgetState | None) -> dict[str, Any]:
    """``status.usage``: tokens and cost of the run and per target, and the budget spent."""
    out: dict[str, Any] = {
        "tokensIn": usage.tokens_in,
        "tokensOut": usage.tokens_out,
        "targets": [_target_usage(t) for t in usage.targets],
    }
    if usage.cost is not None:
        out["cost"] = round(usage.cost, 6)
    if budget is not None:
        out["budget"] = {
            "spentTokens": budget.spent_tokens,
            "spentCost": round(budget.spent_cost, 6),
        }
    return out


def _target_usage(t: TargetUsage) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": t.target,
        "pool": t.pool,
        "answers": t.answers,
        "tokensIn": t.tokens_in,
        "tokensOut": t.tokens_out,
    }
    if t.cost is not None:
        out["cost"] = round(t.cost, 6)
    return out


#: Open batches listed in the status (the oldest first); the count covers all of them.
MAX_LISTED_BATCHES = 20


def batches_status(view: BatchView, now: datetime) -> dict[str, Any]:
    """``status.batches``: items waiting in provider batches, each open batch (provider id,
    counts, age) and the share of results answered through a batch."""
    summary = view.summary
    share = summary.answered_by_batch / summary.answered if summary.answered else 0.0
    listed = []
    for b in view.open[:MAX_LISTED_BATCHES]:
        entry: dict[str, Any] = {
            "submission": b.id,
            "target": b.target,
            "items": b.item_count,
            "providerStatus": b.provider_status or b.state,
            "requestCounts": dict(b.request_counts),
            "createdAt": timestamp(b.created_at),
            "age": eta_text(max(0.0, (now - b.created_at).total_seconds())),
        }
        if b.provider_batch_id:
            entry["providerBatchId"] = b.provider_batch_id
        listed.append(entry)
    return {
        "items": summary.in_batches,
        "openCount": summary.open_batches,
        "answeredByBatch": f"{100 * share:.1f}%",
        "open": listed,
    }


def _message(phase: str, counts: Counts, problems: list[Problem], seen: Observation) -> str:
    if problems:
        return "; ".join(p.message for p in problems)[:4096]
    if phase == PAUSED and seen.budget is not None:
        return budget_message(seen.budget)
    if phase in FINISHED:
        return summary(counts)
    if phase == SUSPENDED:
        return "suspended"
    return f"{seen.ready}/{seen.desired} workers ready"


def changed(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of *new* that differ from *old* (None removes a field in a merge patch)."""
    return {k: v for k, v in new.items() if old.get(k) != v}

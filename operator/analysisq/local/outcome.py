"""How a local run ended (``RunOutcome``) and what a person reads then (``summary``).

The supervisor (``runner``) fills a ``RunOutcome``; ``analysisq run`` and ``analysisq demo``
print its ``summary`` and exit with its ``exit_code``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from analysisq.local.progress import duration
from analysisq.local.usage_text import usage_json, usage_lines
from analysisq.providers import api_key_variable
from analysisq.queue import monitor
from analysisq.queue.batches import BatchSummary
from analysisq.queue.budget import BudgetState
from analysisq.queue.runs import Run
from analysisq.queue.states import Counts
from analysisq.queue.usage import RunUsage


class Ending(StrEnum):
    FINISHED = "finished"
    PAUSED = "paused"
    BUDGET = "paused: budget exhausted"
    INTERRUPTED = "interrupted"


@dataclass
class RunOutcome:
    """How a local run ended."""

    run: Run
    ending: Ending
    counts: Counts
    elapsed: float
    #: Items that became terminal during this session (a resumed run had some already).
    done_here: int = 0
    restarts: int = 0
    paused: dict[str, str] = field(default_factory=dict)
    #: Paused targets whose pause is the circuit breaker's (a wrong model or endpoint).
    faulted: frozenset[str] = frozenset()
    results_path: Path | None = None
    results_written: int = 0
    retry: monitor.RetryReport | None = None
    usage: RunUsage | None = None
    budget: BudgetState | None = None
    #: Runs with targets in mode batch: answers through provider batches, batches open.
    batches: BatchSummary | None = None

    @property
    def within_allowance(self) -> bool:
        return not self.counts.failed_too_often(self.run.spec.max_failed_ratio)

    @property
    def exit_code(self) -> int:
        """0 finished within the failure allowance; 1 too many failures; 3 paused (targets or
        budget); 130 Ctrl-C."""
        if self.ending is Ending.INTERRUPTED:
            return 130
        if self.ending in (Ending.PAUSED, Ending.BUDGET):
            return 3
        return 0 if self.within_allowance else 1


def summary(outcome: RunOutcome, *, resume: str = "analysisq run --resume") -> list[str]:
    """What a person reads when the run is over; *resume* is the command that continues it."""
    c, run = outcome.counts, outcome.run
    rate = outcome.done_here / outcome.elapsed if outcome.elapsed > 0 else 0.0
    lines: list[str] = []
    if outcome.ending is Ending.FINISHED:
        lines.append(
            f"Run {run.id} finished in {duration(outcome.elapsed)}: {c.total:,} items, "
            f"{c.completed:,} completed, {c.failed_for_good:,} failed for good "
            f"({100 * c.failed_ratio:.2f}%; allowed {100 * run.spec.max_failed_ratio:g}%)"
            f", {rate:,.1f} items/s."
        )
    else:
        lines.append(
            f"Run {run.id} stopped ({outcome.ending}) after {duration(outcome.elapsed)}: "
            f"{c.terminal:,} of {c.total:,} items done ({c.completed:,} completed, "
            f"{c.failed_for_good:,} failed), {c.pending + c.retrying + c.processing:,} left."
        )
    if outcome.retry is not None:
        lines.extend(_retry_lines(outcome.retry, c))
    if outcome.restarts:
        lines.append(f"Workers: {outcome.restarts} unexpected exits, each restarted.")
    if outcome.usage is not None:
        state = outcome.budget
        shown = None if state is None else {**vars(state), "exhausted": state.exhausted}
        lines.extend(usage_lines(usage_json(outcome.usage), shown))
    if outcome.batches is not None:
        lines.extend(_batch_lines(outcome.batches, f"{resume} {run.id}"))
    if outcome.results_path is not None:
        lines.append(f"Results: {outcome.results_path} ({outcome.results_written:,} rows).")
    for target, reason in outcome.paused.items():
        lines.append(f"Target {target!r} is PAUSED: {reason}")
    if outcome.ending is Ending.PAUSED:
        keyed = [t for t in outcome.paused if t not in outcome.faulted]
        fixes = [f"the API key ({', '.join(api_key_variable(run.spec.target(t)) for t in keyed)})"]
        fixes = fixes if keyed else []
        if outcome.faulted:
            fixes.append("the setting each reason names")
        then = f"{resume} {run.id}"
        if outcome.faulted:
            then += " [--target NAME=PROVIDER:MODEL[@ENDPOINT]]"
        lines.append(
            f"Only items of paused targets are left. Fix {' and '.join(fixes)}, then: {then}"
        )
    elif outcome.ending is Ending.BUDGET:
        lines.append(
            f"The budget cannot cover the next request: {c.pending + c.retrying:,} items wait, "
            f"none lost. Raise it and continue: {resume} {run.id} --budget {_raised(run)}"
        )
    elif outcome.ending is Ending.INTERRUPTED:
        lines.append(f"Nothing is lost. Continue with: {resume} {run.id}")
    elif not outcome.within_allowance:
        lines.append(
            f"Too many items failed for good; see `analysisq errors {run.id}` and "
            f"`analysisq failed {run.id}`."
        )
    return lines


def _batch_lines(b: BatchSummary, then: str) -> list[str]:
    share = 100 * b.answered_by_batch / b.answered if b.answered else 0.0
    lines = [
        f"Provider batches: {b.answered_by_batch:,} of {b.answered:,} answers ({share:.1f}%) "
        "came through a batch (priced at the batch discount)."
    ]
    if b.open_batches:
        lines.append(
            f"{b.in_batches:,} items still wait in {b.open_batches} open provider batches; "
            f"their answers are ingested when the run continues: {then}"
        )
    return lines


def _raised(run: Run) -> str:
    """A ``--budget`` value that doubles what the run has now."""
    b = run.spec.budget
    assert b is not None
    parts = [f"maxCost={2 * b.max_cost:g}"] if b.max_cost is not None else []
    if b.max_tokens is not None:
        parts.append(f"maxTokens={2 * b.max_tokens}")
    return ",".join(parts)


def _retry_lines(retry: monitor.RetryReport, counts: Counts) -> list[str]:
    by_attempt = ", ".join(f"{n:,} on attempt {a}" for a, n in retry.completed_by_attempt.items())
    lines = [f"Attempts: {by_attempt or 'none completed'}."]
    if retry.recovered:
        tail = (
            "every item recovered"
            if counts.failed_for_good == 0
            else f"{counts.failed_for_good:,} items failed for good"
        )
        lines.append(f"Retries recovered {retry.recovered:,} items that failed at first; {tail}.")
    if retry.deferrals:
        lines.append(
            f"Rate limits: {retry.deferrals:,} answers 429 deferred {retry.deferred_items:,} "
            "items without spending an attempt."
        )
    if retry.lease_lost_items:
        lines.append(
            f"Recovered from dead workers: {retry.lease_lost_items:,} items whose lease expired."
        )
    return lines

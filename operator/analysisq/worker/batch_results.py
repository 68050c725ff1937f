"""Ingest one ended provider batch: match results to claims, write each exactly once.

``ingest`` reads the items still waiting in the submission (id and claim token), streams the
batch's results and matches each by ``custom_id``: an answer joins a buffer written with the
same fenced, write-once ``items.complete`` as the sync path (``via_batch``); a per-item error
goes through the same ``RetryPolicy`` and ``queue.decisions.apply`` as a sync error;
``expired``/``canceled`` results and items with no result stay waiting, and
``queue.batches.finish`` puts them back unspent. Lines that cannot
be read, ``custom_id`` values that match no item held when the ingest began, and results
for items whose claim ended while it ran (the fenced write refused them) are logged as
errors, never written: a second ingest after a crash writes nothing twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import assert_never

import asyncpg

from analysisq.db.connect import acquire
from analysisq.errors import ProviderError
from analysisq.providers.batch import BatchClient, BatchState, custom_id
from analysisq.queue import batches, decisions, items
from analysisq.queue.decisions import Defer, Fail, Pause, Retry
from analysisq.queue.items import ClaimedItem, Outcome
from analysisq.queue.retry import PolicyDecision, RetryPolicy
from analysisq.worker import batch_budget

log = logging.getLogger("analysisq.worker.batch")

#: Results written per statement.
WRITE_CHUNK = 1000
#: Example ids quoted when summarising results that matched nothing.
EXAMPLES = 5


@dataclass
class IngestReport:
    """What one ingest did; ``finish`` records it as the submission's outcome."""

    completed: int = 0
    retried: int = 0
    failed: int = 0
    deferred: int = 0
    unspent: int = 0
    lost: int = 0
    unreadable: int = 0
    unmatched: list[str] = field(default_factory=list)
    unmatched_count: int = 0
    paused: set[str] = field(default_factory=set)

    def line(self) -> str:
        parts = [
            f"{self.completed} completed",
            f"{self.retried} to retry",
            f"{self.failed} failed",
            f"{self.deferred} deferred",
            f"{self.unspent} unspent",
        ]
        if self.unreadable:
            parts.append(f"{self.unreadable} unreadable lines")
        if self.unmatched_count:
            parts.append(f"{self.unmatched_count} results for items not held")
        if self.lost:
            parts.append(f"{self.lost} results for claims lost while ingesting")
        return ", ".join(parts)


async def ingest(
    pool: asyncpg.Pool,
    run_id: str,
    submission_id: int,
    client: BatchClient,
    state: BatchState,
    *,
    policy: RetryPolicy,
    rng: random.Random,
    step: Callable[[str], Awaitable[None]] | None = None,
    budgeted: bool = False,
) -> IngestReport:
    """Write every result of *state* for the items of *submission_id* still held (and, for a
    run with a budget, spend what they cost); *step* (tests) is called after each chunk
    written."""
    report = IngestReport()
    async with acquire(pool) as conn:
        waiting = await batches.waiting_items(conn, submission_id)
    # By custom_id (item and claim token): a line is matched without parsing its id.
    held = {custom_id(i.id, i.token): i for i in waiting}
    buffer: list[Outcome] = []
    # One chunk is written while the next is read and parsed.
    writing: asyncio.Task[None] | None = None
    try:
        async for result in client.results(state):
            if result.problem is not None or result.custom_id is None:
                report.unreadable += 1
                log.error(
                    "unreadable batch result",
                    extra={"run": run_id, "submission": submission_id, "problem": result.problem},
                )
                continue
            # Popped: a second line for the same custom_id matches nothing.
            item = held.pop(result.custom_id, None)
            if item is None:
                report.unmatched_count += 1
                if len(report.unmatched) < EXAMPLES:
                    report.unmatched.append(result.custom_id)
                continue
            if result.unspent:
                report.unspent += 1
            elif result.completion is not None:
                buffer.append(Outcome(item, result.completion))
                if len(buffer) >= WRITE_CHUNK:
                    if writing is not None:
                        await writing
                    writing = asyncio.create_task(_write(pool, run_id, buffer, report, budgeted))
                    buffer = []
                    if step is not None:
                        await step("ingesting")
            elif result.error is not None:
                decision = policy.decide(
                    result.error,
                    attempt=item.attempt,
                    max_attempts=item.max_attempts,
                    deferrals=item.deferrals,
                    rng=rng,
                )
                async with acquire(pool) as conn:
                    await _apply(conn, run_id, item, decision, report)
        if writing is not None:
            await writing
    except BaseException:
        if writing is not None and not writing.done():
            writing.cancel()
            with contextlib.suppress(BaseException):
                await writing
        raise
    await _write(pool, run_id, buffer, report, budgeted)
    report.unspent += len(held)
    if report.unmatched_count:
        log.error(
            "batch results matched no item held by the submission (unknown custom_id, or "
            "already answered before an adoption); nothing written for them",
            extra={
                "run": run_id,
                "submission": submission_id,
                "count": report.unmatched_count,
                "examples": report.unmatched,
            },
        )
    _log_lost(run_id, submission_id, report)
    return report


def _log_lost(run_id: str, submission_id: int, report: IngestReport) -> None:
    if report.lost:
        log.error(
            "batch results for items whose claim ended while they were ingested (another "
            "worker or a reset took them); nothing written for them",
            extra={"run": run_id, "submission": submission_id, "count": report.lost},
        )


async def _write(
    pool: asyncpg.Pool, run_id: str, buffer: list[Outcome], report: IngestReport, budgeted: bool
) -> None:
    if not buffer:
        return
    async with acquire(pool) as conn, conn.transaction():
        written = await items.complete(conn, buffer, via_batch=True)
        if budgeted:
            await batch_budget.spend(conn, run_id, [o for o in buffer if o.item.id in written])
    report.completed += len(written)
    report.lost += len(buffer) - len(written)


async def _apply(
    conn: asyncpg.Connection,
    run_id: str,
    item: ClaimedItem,
    decision: PolicyDecision,
    report: IngestReport,
) -> None:
    """Apply the retry policy's *decision* with ``decisions.apply``, as the sync path does."""
    applied = await decisions.apply(conn, item, decision)
    match decision:
        case Retry():
            report.retried += 1
        case Fail():
            report.failed += 1
        case Defer():
            report.deferred += 1
        case Pause():
            report.paused.add(item.target)
            if applied.paused_target:
                log.error(
                    "target paused for the run: provider refused our credentials",
                    extra={"run": run_id, "target": item.target, "error": decision.message},
                )
        case _:
            assert_never(decision)
    if not applied.written:
        report.lost += 1


async def fail_all(
    pool: asyncpg.Pool,
    run_id: str,
    submission_id: int,
    error: ProviderError,
    *,
    policy: RetryPolicy,
    rng: random.Random,
) -> IngestReport:
    """A batch refused as a whole for a reason that is not back-pressure: every item takes
    *error* through the retry policy (so a batch that can never pass ends its items)."""
    report = IngestReport()
    async with acquire(pool) as conn:
        waiting = await batches.waiting_items(conn, submission_id)
        for item in waiting:
            decision = policy.decide(
                error,
                attempt=item.attempt,
                max_attempts=item.max_attempts,
                deferrals=item.deferrals,
                rng=rng,
            )
            await _apply(conn, run_id, item, decision, report)
    _log_lost(run_id, submission_id, report)
    return report

"""What happens to a claim once its attempt has a verdict other than an answer.

``Settler.settle`` hands the ``Decision`` to ``queue.decisions.apply`` and keeps trying while
the database is away or its transaction lost a conflict (the claim stays held, so the
heartbeat keeps renewing its lease); a write the database refuses deterministically fails the
item for good with the database's reason instead of looping. ``write_results`` writes the
buffered answers as one batch and ends the claims it wrote. ``forget``, ``after_write`` and
``abandon`` end a claim's record in ``inflight`` and free its slot; ``WorkerStats`` counts what
happened.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, assert_never

import asyncpg

from analysisq.db.connect import acquire
from analysisq.errors import DatabaseError, DatabaseTransient, ErrorClass
from analysisq.queue.decisions import (
    Applied,
    Decision,
    Defer,
    Fail,
    Pause,
    Release,
    Retry,
    apply,
)
from analysisq.queue.items import ClaimedItem
from analysisq.worker.inflight import InFlight, InFlightClaim
from analysisq.worker.results import ResultBuffer


@dataclass
class WorkerStats:
    claimed: int = 0
    completed: int = 0
    retried: int = 0
    failed: int = 0
    deferred: int = 0
    released: int = 0
    lost: int = 0
    paused_targets: set[str] = field(default_factory=set)


class Log(Protocol):
    def __call__(
        self, level: int, msg: str, item: ClaimedItem | None = None, **kw: object
    ) -> None: ...


class Settler:
    """Ends claims: applies decisions, forgets written or lost claims, counts them."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        inflight: InFlight,
        results: ResultBuffer,
        stats: WorkerStats,
        log: Log,
        on_free: Callable[[], None],
        on_claimed: Callable[[list[ClaimedItem]], None],
    ) -> None:
        self.pool = pool
        self.inflight = inflight
        self.results = results
        self.stats = stats
        self._log = log
        self._on_free = on_free
        self._on_claimed = on_claimed

    async def settle(
        self, record: InFlightClaim, decision: Decision, *, wait_for_db: bool = True
    ) -> None:
        """Apply *decision* to the claim: retried through an outage or a conflict (the claim
        stays held, so the heartbeat keeps its lease); a refusal fails the item, saying why."""
        item = record.item
        self._log(
            logging.INFO,
            f"item {decision.action}",
            item,
            error_class=str(getattr(decision, "error_class", "")),
            error=decision.message,
            delay=decision.delay,
        )
        delay, refused = 0.5, False
        while self.inflight.get(item) is record:
            record.finishing = True
            try:
                async with acquire(self.pool) as conn:
                    applied = await apply(conn, item, decision)
            except DatabaseTransient as exc:
                if not wait_for_db:
                    # Nothing is lost: the lease expires and the rescuer requeues the item.
                    self._log(logging.WARNING, "could not release; left to its lease", item)
                    return
                self._log(logging.WARNING, "write failed; retrying", item, error=exc.message)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            except DatabaseError as exc:
                # Deterministic: the same write would be refused again, so never loop on it.
                if refused:
                    self._log(
                        logging.ERROR,
                        "the database refused the item's failure; left to its lease",
                        item,
                        error=exc.message,
                    )
                    self.forget(record)
                    return
                refused = True
                decision = Fail(
                    ErrorClass.PERMANENT,
                    f"the database refused to record this item's outcome: {exc.message}",
                )
                continue
            finally:
                record.finishing = False
            self._count(item, decision, applied)
            self.after_write(record, applied.written)
            return

    async def write_results(self) -> None:
        """Write the buffered answers as one batch (``ResultBuffer.write``), end the claims
        it wrote or found fenced and start those it made; a refused answer fails its item,
        saying why."""
        if not len(self.results):
            return
        batch = self.results.take()
        records = {o.item.key: self.inflight.get(o.item) for o in batch}
        for r in records.values():
            if r is not None:
                r.finishing = True
        report = await self.results.write(self.pool, batch)
        for o in report.kept:
            if (r := records[o.item.key]) is not None:
                r.finishing = False  # the lease is still renewed; the next flush retries
        if report.unavailable:
            self._log(logging.WARNING, "results not written yet", error=report.unavailable)
        for o in report.written:
            self.stats.completed += 1
            if (r := records[o.item.key]) is not None:
                self.forget(r)
        for o in report.fenced:
            if (r := records[o.item.key]) is not None and self.inflight.get(o.item) is r:
                self.after_write(r, False)
        if report.claimed:
            # Right after the written claims are forgotten, with no wait in between: the
            # claim loop, woken by the freed places, finds them filled.
            self._on_claimed(report.claimed)
        for o, reason in report.refused:
            if (r := records[o.item.key]) is not None:
                r.finishing = False
                refusal = Fail(
                    ErrorClass.PERMANENT, f"the database refused to store the answer: {reason}"
                )
                await self.settle(r, refusal)

    def _count(self, item: ClaimedItem, decision: Decision, applied: Applied) -> None:
        match decision:
            case Retry():
                self.stats.retried += 1
            case Fail():
                self.stats.failed += 1
            case Defer():
                self.stats.deferred += 1
            case Pause():
                if applied.paused_target:
                    self._log(
                        logging.ERROR,
                        "target paused for the run: provider refused our credentials",
                        item,
                        error=decision.message,
                    )
                self.stats.paused_targets.add(item.target)
            case Release():
                self.stats.released += int(applied.written)
            case _:
                assert_never(decision)

    def after_write(self, record: InFlightClaim, applied: bool) -> None:
        if not applied:
            self.stats.lost += 1
            self._log(logging.WARNING, "lease lost; write refused", record.item)
        self.forget(record)

    def forget(self, record: InFlightClaim) -> None:
        self.inflight.forget(record.item)
        self._on_free()

    def abandon(self, record: InFlightClaim, why: str) -> None:
        """Stop working on a claim that is no longer ours; write nothing for it."""
        self.stats.lost += 1
        self._log(logging.WARNING, why, record.item)
        if record.task is not None:
            record.task.cancel()
        self.results.drop(record.item)
        self.forget(record)

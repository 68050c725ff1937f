"""The submissions one batch driver holds, and the leases that keep them its own.

``SubmissionLeases`` renews the lease of every submission the driver holds every quarter
lease (a submission whose lease was lost is dropped: another worker adopted it) and touches
their waiting items every ``TOUCH_SECONDS`` (``batch_touch_items``), so items inside a
provider batch for hours never look stuck and are never rescued. On the way out,
``hand_over`` ends the leases at once, so whoever comes next takes the submissions without
waiting for them to expire. ``finish`` ends one for good: its items without an answer go
back unspent and its budget reservation is given back, in one transaction.
"""

from __future__ import annotations

import asyncio
import logging
import time

import asyncpg

from analysisq.db.connect import acquire
from analysisq.errors import DatabaseError
from analysisq.queue import batches
from analysisq.worker import batch_budget

log = logging.getLogger("analysisq.worker.batch")

#: Waiting items are touched this often: well inside the seed's 10-minute "stuck" query.
TOUCH_SECONDS = 120.0
#: Their lease: three touches, so one missed touch (a slow database) is not a lost lease.
ITEM_LEASE_SECONDS = 3 * TOUCH_SECONDS


class SubmissionLeases:
    """What one driver holds (see the module docstring)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        run_id: str,
        *,
        worker: str,
        lease_seconds: float,
        touch_seconds: float = TOUCH_SECONDS,
    ) -> None:
        self.pool = pool
        self.run_id = run_id
        self.worker = worker
        self.lease_seconds = lease_seconds
        self._touch_every = touch_seconds
        self.owned: set[int] = set()
        self._touched: dict[int, float] = {}

    def hold(self, sub_id: int, *, touched: bool = False) -> None:
        """*sub_id* is ours (*touched*: its items were claimed just now)."""
        self.owned.add(sub_id)
        if touched:
            self._touched[sub_id] = time.monotonic()

    def drop(self, sub_id: int) -> None:
        self.owned.discard(sub_id)
        self._touched.pop(sub_id, None)

    def extra(self, sub_id: int, **kw: object) -> dict[str, object]:
        """A log record's fields about submission *sub_id*."""
        return {"run": self.run_id, "worker": self.worker, "submission": sub_id, **kw}

    async def finish(
        self, sub_id: int, target: str, outcome: str, *, release_in: float = 0.0
    ) -> None:
        """End the submission (its items without an answer back unspent after *release_in*
        seconds) and give back its budget reservation, in one transaction."""
        reason = outcome if release_in else None
        async with acquire(self.pool) as conn, conn.transaction():
            finished = await batches.finish(
                conn,
                sub_id,
                worker=self.worker,
                outcome=outcome,
                release_in=release_in,
                reason=reason,
            )
            if finished is not None:
                await batch_budget.release(conn, self.run_id, target, finished.reserved)
        self.drop(sub_id)
        released = finished.released if finished else None
        log.info(
            "batch submission finished",
            extra=self.extra(sub_id, outcome=outcome, released=released),
        )

    async def touch_if_due(self, sub_id: int) -> None:
        if time.monotonic() - self._touched.get(sub_id, 0.0) < self._touch_every:
            return
        async with acquire(self.pool) as conn:
            await batches.touch_items(
                conn, sub_id, worker=self.worker, lease_seconds=ITEM_LEASE_SECONDS
            )
        self._touched[sub_id] = time.monotonic()

    async def heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.lease_seconds / 4)
            owned = sorted(self.owned)
            try:
                async with acquire(self.pool) as conn:
                    kept = await batches.heartbeat(
                        conn, owned, worker=self.worker, lease_seconds=self.lease_seconds
                    )
                for sub_id in kept:
                    await self.touch_if_due(sub_id)
            except DatabaseError as exc:
                log.warning(
                    "batch heartbeat failed", extra={"run": self.run_id, "error": exc.message}
                )
                continue
            for lost in set(owned) - kept:
                self.drop(lost)

    async def hand_over(self) -> None:
        """End the leases of the submissions still ours, so whoever comes next (a worker, or
        the operator cancelling a deleted run's batches) takes them at once."""
        try:
            async with acquire(self.pool) as conn:
                await batches.release_leases(conn, sorted(self.owned), worker=self.worker)
        except DatabaseError as exc:
            log.warning(
                "could not hand over batch submissions; their leases will expire",
                extra={"run": self.run_id, "error": exc.message},
            )
        self.owned.clear()
        self._touched.clear()

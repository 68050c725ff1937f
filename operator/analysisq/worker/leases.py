"""Leases beside the serving loops: the worker's own kept alive, dead workers' taken back.

``Leases.heartbeat_loop`` renews the lease of every held claim every third of a lease (or of
the stuck threshold) and abandons the claims whose lease was lost, their late writes being
refused anyway. ``Leases.rescue_loop`` resets the run's stuck items every quarter lease (at
most 15 s), so a crashed worker's items come back within about 1.25 leases;
``rescue_at_start`` does it once as the worker starts, as the seed's ``process-queue`` did.
``worker.loops.Worker`` runs both loops beside its claim and flush loops.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass

import asyncpg

from analysisq.db.connect import acquire
from analysisq.errors import DatabaseError, DatabaseTransient
from analysisq.queue import items, rescue
from analysisq.worker.inflight import InFlight
from analysisq.worker.settle import Log, Settler


@dataclass(frozen=True)
class Leases:
    """The lease upkeep of one worker on one run."""

    pool: asyncpg.Pool
    run_id: str
    inflight: InFlight
    settler: Settler
    lease: float
    stuck_after_seconds: float
    rng: random.Random
    log: Log

    async def heartbeat_loop(self) -> None:
        # Renewals also touch updated_at: beating at least three times per stuck threshold
        # (and per the seed's 10-minute stuck query) keeps a live claim from looking stuck.
        interval = min(self.lease, self.stuck_after_seconds, 600.0) / 3
        wait = interval
        while True:
            await asyncio.sleep(wait)
            wait = interval
            records = list(self.inflight)
            if not records:
                continue
            try:
                # A renewal slower than its interval is as good as lost: give up and retry.
                async with acquire(self.pool, timeout=interval) as conn:
                    kept = await items.heartbeat(
                        conn, [r.item for r in records], self.lease, timeout=interval
                    )
            except DatabaseError as exc:
                # Retried soon, not a whole interval later: once the database is back the
                # leases must be renewed before anyone takes them for a dead worker's.
                self.log(logging.WARNING, "heartbeat failed; retrying", error=exc.message)
                wait = min(interval, 0.5)
                continue
            for r in records:
                if r.item.id in kept or r.finishing or self.inflight.get(r.item) is not r:
                    continue
                # Someone else owns it now; stop working on it, write nothing.
                self.settler.abandon(r, "lease lost; abandoning item")

    async def rescue_at_start(self) -> None:
        try:
            async with acquire(self.pool) as conn:
                res = await rescue.rescue_stuck(conn, self.run_id, self.stuck_after_seconds)
            if res.reset or res.poisoned:
                self.log(logging.WARNING, "reset stuck items at start", **vars(res))
        except DatabaseTransient as exc:
            # An outage as the worker starts is no reason to die: the rescue loop resets on
            # its own interval, and the claim loop waits for the database.
            self.log(logging.WARNING, "stuck reset at start skipped", error=exc.message)

    async def rescue_loop(self) -> None:
        # A dead worker's lease runs out at most one lease after its last heartbeat; checking
        # every quarter lease (at most 15 s) brings its items back within about 1.25 leases.
        period = min(self.lease / 4, 15.0)
        while True:
            await asyncio.sleep(period * self.rng.uniform(0.8, 1.2))
            try:
                async with acquire(self.pool) as conn:
                    # Our own claims are alive (we are): never reset them, even when an
                    # outage let their leases run out before the heartbeat could renew them.
                    res = await rescue.rescue_stuck(
                        conn,
                        self.run_id,
                        self.stuck_after_seconds,
                        live_tokens=[i.token for i in self.inflight.items()],
                    )
            except DatabaseError:
                continue
            if res.reset or res.poisoned:
                self.log(logging.WARNING, "reset stuck items", **vars(res))

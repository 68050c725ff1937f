"""A run's budget around a provider batch: reserve before the POST, spend at ingest, release
at the end.

``reserve`` runs before a batch is sent, in one transaction: the estimates of its requests
(``analysisq.tokens.estimate``, priced at the batch discount) are reserved from the run's
budget, for as many requests as fit (halving until they do; the requests cut go back
unspent), and recorded on the submission, so an adopter that sends it after a crash does not
reserve again. When not even one fits, the run is paused for its budget, as on the sync
path, and the whole batch goes back unspent. ``spend`` adds what the answers of a written
chunk cost, in the chunk's own transaction (an ingest repeated after a crash writes and
spends nothing twice); ``release`` gives the reservation back in the transaction that
finishes the submission (``queue.batches.finish`` returns it). So spent + reserved never
under-counts what a batch in flight may cost, and the sync path's overshoot bound holds.
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from analysisq.db.connect import acquire
from analysisq.queue import batches, budget, items
from analysisq.queue.items import ClaimedItem, Outcome
from analysisq.spec import Target
from analysisq.tokens import TokenEstimate


def _total(estimates: Sequence[TokenEstimate]) -> TokenEstimate:
    return TokenEstimate(sum(e.input for e in estimates), sum(e.output for e in estimates))


async def reserve(
    pool: asyncpg.Pool,
    run_id: str,
    submission_id: int,
    *,
    worker: str,
    target: Target,
    sent: Sequence[ClaimedItem],
    estimates: Sequence[TokenEstimate],
) -> int:
    """How many of *sent* (in order; *estimates* theirs, ``tokens.estimate``) the batch may
    send; the rest went back unspent. 0: the run is paused for its budget. All of them when
    the submission already reserved."""
    async with acquire(pool) as conn, conn.transaction():
        if not await batches.reservation_needed(conn, submission_id, worker=worker):
            return len(sent)
        n = len(sent)
        while n and not await budget.reserve(
            conn, run_id, target.name, _total(estimates[:n]), via_batch=True, pause=False
        ):
            n //= 2
        if n == 0:
            await budget.exhaust(conn, run_id)
        await batches.record_reservation(
            conn, submission_id, worker=worker, reserved=_total(estimates[:n])
        )
        for item in sent[n:] if n else ():
            await items.release(conn, item, message="the run's budget cannot cover it yet")
    return n


async def spend(conn: asyncpg.Connection, run_id: str, written: Sequence[Outcome]) -> None:
    """What the answers *written* cost, at the batch discount (usage a provider did not
    report counts as none: the Batch APIs report it for every answer)."""
    by_target: dict[str, tuple[int, int]] = {}
    for o in written:
        tin, tout = by_target.get(o.item.target, (0, 0))
        by_target[o.item.target] = (
            tin + (o.completion.tokens_in or 0),
            tout + (o.completion.tokens_out or 0),
        )
    nothing = TokenEstimate(0, 0)
    for name, (tin, tout) in by_target.items():
        await budget.settle(conn, run_id, name, nothing, tin, tout, via_batch=True)


async def release(
    conn: asyncpg.Connection, run_id: str, target: str, reserved: TokenEstimate | None
) -> None:
    """Give back what a finished submission reserved."""
    if reserved is not None and reserved.total:
        await budget.settle(conn, run_id, target, reserved, 0, 0, via_batch=True)

"""What the worker calls around one provider request: reserve, wait, settle.

``reserve`` reserves the request's tokens in its rate pool and, for a run with a budget, its
tokens and cost (``BudgetExhausted`` when they do not fit: the worker gives the item back
unspent), and returns a ``Grant`` saying how long to wait for the slot (the pool's limit and
any Retry-After block). ``wait`` sleeps that long, and longer if answers that cost more than
they reserved pushed the pool's schedule back meanwhile. ``settle`` replaces the estimate
with the answer's usage, or gives the reservation back when there was no answer. A target
without limits in a run without a budget costs no database round trip here. Modules below:
``ratelimit`` (pools), ``budget`` (a run's spending), ``analysisq.tokens`` (the
estimate).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace

import asyncpg

from analysisq.completion import Completion
from analysisq.db.connect import acquire
from analysisq.errors import BudgetExhausted
from analysisq.queue import budget, ratelimit
from analysisq.spec import AnalysisRunSpec, Target
from analysisq.tokens import TokenEstimate, estimate

#: The estimate of a request that reserves nothing (no rate limit, no budget).
NOTHING = TokenEstimate(0, 0)


@dataclass(frozen=True)
class Grant:
    """One request's reservation."""

    run_id: str
    target: Target
    pool: str
    estimate: TokenEstimate
    #: Seconds to wait before sending.
    wait: float
    budgeted: bool
    #: The pool's token debt at reservation (``ratelimit.token_debt``).
    debt: float = 0.0

    @property
    def reserves_nothing(self) -> bool:
        """No rate limit, no budget: every request of the target gets this same grant."""
        return not self.budgeted and not ratelimit.is_limited(self.target)

    @property
    def token_limited(self) -> bool:
        rl = self.target.rate_limit
        return rl is not None and rl.tokens_per_minute is not None


async def reserve(
    db: asyncpg.Pool,
    run_id: str,
    spec: AnalysisRunSpec,
    target: Target,
    prompt: str,
) -> Grant:
    """Reserve a request of *prompt* to *target* (a Retry-After block kept the claim from
    handing out the item at all, so an unlimited target needs no round trip here)."""
    budgeted = spec.budget is not None
    limited = ratelimit.is_limited(target)
    grant = Grant(
        run_id=run_id,
        target=target,
        pool=ratelimit.pool_name(run_id, target),
        # nothing to reserve, nothing to estimate (``settle`` has nothing to correct either)
        estimate=estimate(target, prompt) if budgeted or limited else NOTHING,
        wait=0.0,
        budgeted=budgeted,
    )
    if not (budgeted or limited):
        return grant
    async with acquire(db) as conn:
        if grant.budgeted and not await budget.reserve(conn, run_id, target.name, grant.estimate):
            raise BudgetExhausted()
        if not limited:
            return grant
        slot = await ratelimit.acquire(conn, grant.pool, grant.estimate.total)
    return replace(grant, wait=slot.wait, debt=slot.debt)


async def wait(db: asyncpg.Pool, grant: Grant) -> None:
    """Sleep until the granted slot, and longer by what answers that cost more than they
    reserved pushed the pool's schedule back meanwhile (token-limited pools)."""
    if grant.wait <= 0:
        return
    await asyncio.sleep(grant.wait)
    debt = grant.debt
    while grant.token_limited:
        async with acquire(db) as conn:
            now = await ratelimit.token_debt(conn, grant.pool)
        if now - debt < 0.001:
            return
        await asyncio.sleep(now - debt)
        debt = now


async def settle(db: asyncpg.Pool, grant: Grant, completion: Completion | None) -> None:
    """Account for the answer (*completion*) or, without one, give the reservation back.

    Usage the provider did not report counts as estimated. An answer whose headers say the
    provider's limit is exhausted blocks the pool until it resets.
    """
    blocked = completion.limit_reset_s if completion is not None else None
    if not (grant.budgeted or grant.token_limited or blocked):
        return
    est = grant.estimate
    if completion is None:
        used_in = used_out = 0
    else:
        used_in = est.input if completion.tokens_in is None else completion.tokens_in
        used_out = est.output if completion.tokens_out is None else completion.tokens_out
    async with acquire(db) as conn:
        if blocked:
            await ratelimit.backoff(conn, grant.run_id, grant.target.name, blocked)
        if grant.token_limited:
            await ratelimit.settle_tokens(conn, grant.pool, used_in + used_out - est.total)
        if grant.budgeted:
            await budget.settle(conn, grant.run_id, grant.target.name, est, used_in, used_out)

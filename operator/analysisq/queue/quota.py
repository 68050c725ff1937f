"""What the worker calls around one provider request: reserve before, settle after.

``reserve`` waits for nothing itself: it returns a ``Grant`` with the seconds to wait for the
rate slot (the pool's limit and any Retry-After block) after reserving the request's tokens
in the pool and, for a run with a budget, its tokens and cost (``BudgetExhausted`` when they
do not fit: the worker gives the item back unspent). ``settle`` replaces the estimate with
the answer's usage, or gives the reservation back when there was no answer. A target without
limits in a run without a budget costs no database round trip here. Modules below:
``ratelimit`` (pools), ``budget`` (a run's spending), ``analysisq.providers.tokens``
(the estimate).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import asyncpg

from analysisq.db.connect import acquire
from analysisq.errors import BudgetExhausted
from analysisq.providers.base import Completion
from analysisq.providers.tokens import TokenEstimate, estimate
from analysisq.queue import budget, ratelimit
from analysisq.spec import AnalysisRunSpec, Target


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
    *,
    blocked_seconds: float = 0.0,
) -> Grant:
    """Reserve a request of *prompt* to *target*; *blocked_seconds* is the claim's block."""
    grant = Grant(
        run_id=run_id,
        target=target,
        pool=ratelimit.pool_name(run_id, target),
        estimate=estimate(target, prompt),
        wait=blocked_seconds,
        budgeted=spec.budget is not None,
    )
    limited = ratelimit.is_limited(target)
    if not (grant.budgeted or limited):
        return grant
    wait = blocked_seconds
    async with acquire(db) as conn:
        if grant.budgeted and not await budget.reserve(conn, run_id, target.name, grant.estimate):
            raise BudgetExhausted()
        if limited:
            wait = max(wait, await ratelimit.acquire(conn, grant.pool, grant.estimate.total))
    return replace(grant, wait=wait)


async def settle(db: asyncpg.Pool, grant: Grant, completion: Completion | None) -> None:
    """Account for the answer (*completion*) or, without one, give the reservation back.

    Usage the provider did not report counts as estimated.
    """
    if not (grant.budgeted or grant.token_limited):
        return
    est = grant.estimate
    if completion is None:
        used_in = used_out = 0
    else:
        used_in = est.input if completion.tokens_in is None else completion.tokens_in
        used_out = est.output if completion.tokens_out is None else completion.tokens_out
    async with acquire(db) as conn:
        if grant.token_limited:
            await ratelimit.settle_tokens(conn, grant.pool, used_in + used_out - est.total)
        if grant.budgeted:
            await budget.settle(conn, grant.run_id, grant.target.name, est, used_in, used_out)

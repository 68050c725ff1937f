"""One attempt of one claim: the checks, the rate slot, the provider call, the verdict.

``Attempts.run`` returns either the provider's ``Completion`` (the worker buffers it for
``results``) or the ``RetryPolicy``'s decision about the error (the worker hands it to
``queue.decisions.apply``). Around the provider call it reserves and settles the request's
tokens and budget (``queue.quota``); a ``DatabaseError`` raised while it reserves, or
``BudgetExhausted``, reaches the worker, which gives the item back unspent.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable

import asyncpg

from analysisq.completion import Completion
from analysisq.errors import (
    BudgetExhausted,
    DatabaseError,
    ErrorClass,
    InvalidInput,
    ProviderError,
    RateLimited,
    SpecError,
    TransientError,
    redact,
)
from analysisq.providers.base import Provider
from analysisq.queue import quota
from analysisq.queue.decisions import Fail
from analysisq.queue.items import ClaimedItem
from analysisq.queue.retry import PolicyDecision, RetryPolicy
from analysisq.spec import AnalysisRunSpec

log = logging.getLogger("analysisq.worker")


class Attempts:
    """Runs attempts for one run's spec with the given providers (injectable for tests)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        spec: AnalysisRunSpec,
        providers: dict[str, Provider],
        policy: RetryPolicy,
        *,
        rng: random.Random,
        clock: Callable[[], float],
    ) -> None:
        self.pool = pool
        self.spec = spec
        self.providers = providers
        self.policy = policy
        self._rng = rng
        self._clock = clock
        #: Per target: no request before this clock time (this worker's view of Retry-After).
        self._local_backoff: dict[str, float] = {}
        #: Per target that reserves nothing (no rate limit, no budget): its one grant, so
        #: that such a request costs no reservation work per item.
        self._free_grants: dict[tuple[str, str], quota.Grant] = {}

    async def run(self, item: ClaimedItem) -> Completion | PolicyDecision:
        try:
            return await self._run(item)
        except ProviderError as err:
            return self.decide(item, err)
        except (DatabaseError, BudgetExhausted):
            raise
        except Exception as exc:  # a bug in analysisq: count it as a transient failure
            error = redact(repr(exc))
            log.error("unexpected error", extra={"item": item.id, "error": error})
            return self.decide(item, TransientError(f"internal error: {error}"))

    def decide(self, item: ClaimedItem, err: ProviderError) -> PolicyDecision:
        if isinstance(err, RateLimited) and err.delay:
            self._local_backoff[item.target] = self._clock() + err.delay
        return self.policy.decide(
            err,
            attempt=item.attempt,
            max_attempts=item.max_attempts,
            deferrals=item.deferrals,
            rng=self._rng,
        )

    async def _run(self, item: ClaimedItem) -> Completion | PolicyDecision:
        try:
            target = self.spec.target(item.target)
        except SpecError as exc:
            # The run's spec lost this target after the fill: no retry can send it anywhere.
            return Fail(ErrorClass.PERMANENT, f"item {item.id}: {exc.message}")
        if len(item.text) > self.spec.max_prompt_chars:
            raise InvalidInput(
                f"prompt {item.external_id!r} has {len(item.text)} characters;"
                f" the limit is {self.spec.max_prompt_chars}"
            )
        if self._local_backoff:
            await self._wait_local_backoff(item.target)
        grant = self._free_grants.get((item.run_id, item.target))
        if grant is None:
            grant = await quota.reserve(self.pool, item.run_id, self.spec, target, item.text)
            if grant.reserves_nothing:
                self._free_grants[item.run_id, item.target] = grant
        if grant.wait > 0:
            await quota.wait(self.pool, grant)
        try:
            completion = await self.providers[item.target].complete(item.text)
        except ProviderError:
            await self._settle(item, grant, None)
            raise
        await self._settle(item, grant, completion)
        return completion

    async def _settle(
        self, item: ClaimedItem, grant: quota.Grant, completion: Completion | None
    ) -> None:
        try:
            await quota.settle(self.pool, grant, completion)
        except DatabaseError as exc:
            # Never lose a paid answer over its bookkeeping: the reservation stays counted.
            log.warning("usage not settled", extra={"item": item.id, "error": exc.message})

    async def _wait_local_backoff(self, target: str) -> None:
        until = self._local_backoff.get(target, 0.0)
        now = self._clock()
        if until > now:
            await asyncio.sleep(until - now)

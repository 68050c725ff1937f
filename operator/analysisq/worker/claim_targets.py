"""Which targets a claim of the worker takes, and how many of its places it may fill.

Both claims of the worker (the claim loop's and the one a flush makes, ``results.Refill``) ask
``ClaimTargets.places``. Three rules decide:

- the targets in ``mode: batch`` belong to the batch driver (``batch_plan``);
- a target this worker saw paused (the provider refused our credentials) is skipped until the
  database says it was resumed (``refresh``, at most every ``recheck_seconds``): the claims
  would only be sent to meet the same 401;
- places beyond those whose attempt can start at once (prefetch) take no item of a
  rate-limited target. The claim hands out a limited pool's items only with a slot within the
  rate horizon (migration 0010); an item that waits for a running slot of this worker instead
  lets its slot pass, and the pool's later claims hand out more, so a slow pool would fill the
  worker's prefetch with items none of which can start.
"""

from __future__ import annotations

from collections.abc import Callable

import asyncpg

from analysisq.db.connect import acquire
from analysisq.errors import DatabaseError
from analysisq.queue import ratelimit, runs
from analysisq.spec import AnalysisRunSpec
from analysisq.worker.batch_plan import sync_targets_skipped


class ClaimTargets:
    """The paused and rate-limited targets of one worker's run."""

    def __init__(
        self,
        run_id: str,
        spec: AnalysisRunSpec,
        clock: Callable[[], float],
        recheck_seconds: float,
    ) -> None:
        self.run_id = run_id
        self.spec = spec
        self._clock = clock
        self._recheck_seconds = recheck_seconds
        self._recheck_at = 0.0
        #: Targets paused for the run, as this worker last saw them.
        self.paused: set[str] = set()
        self._sync = {t.name for t in spec.targets if t.mode != "batch"}
        #: Sync targets with a rate limit (requests or tokens): no prefetch for them.
        self.limited = frozenset(
            t.name for t in spec.targets if t.name in self._sync and ratelimit.is_limited(t)
        )

    def pause(self, target: str) -> None:
        if target not in self.paused:
            self.paused.add(target)
            self._recheck_at = self._clock() + self._recheck_seconds

    def places(self, free: int, startable: int) -> tuple[int, list[str]]:
        """Of *free* places, of which *startable* can start an attempt at once: how many to
        claim, and the targets to skip (0 = claim nothing until an attempt ends)."""
        skip = [*sync_targets_skipped(self.spec), *sorted(self.paused)]
        if not self.limited or free <= startable:
            return free, skip
        if startable > 0:
            return startable, skip
        rest = [*skip, *sorted(self.limited.difference(skip))]
        if self._sync.issubset(rest):
            return 0, rest
        return free, rest

    def recheck_due(self) -> bool:
        return bool(self.paused) and self._clock() >= self._recheck_at

    async def refresh(self, pool: asyncpg.Pool) -> None:
        """While a target is held paused, re-read the run's paused targets now and then: a
        resumed target is claimed again (its parked items are due)."""
        if not self.recheck_due():
            return
        self._recheck_at = self._clock() + self._recheck_seconds
        try:
            async with acquire(pool) as conn:
                states = await runs.targets(conn, self.run_id)
        except DatabaseError:
            return
        self.paused = {s.target for s in states if s.paused_at is not None}

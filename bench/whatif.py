"""What-if experiments on the analysisq worker, for the ``overhead`` benchmark only.

They are not the production code path: each one patches the worker the way a proposed
change to ``analysisq`` would, so that the benchmark can show what the change would gain
before anyone makes it. ``python -m bench overhead --systems analysisq analysisq:noreset``
runs the production worker and the experiment side by side.

- ``noreset``: the pool hands connections back without asyncpg's reset round trip
  (``SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL``), which the worker
  pays on every release, including one per item for the rate-limit check of a target that
  has no rate limit. (A no-op where ``create_pool`` already passes its own ``reset``.)
- ``eager``: a concurrency slot frees as soon as the provider has answered, instead of when
  the result has been written (the lease of an answered item is still held and renewed until
  its batched completion is written), and the claim loop claims once at least half a batch
  is free, so that claims stay batched while they overlap with completions.
- ``norate``: an item whose target has no rate limit skips the pool acquire (and release)
  that the worker makes for the rate-limit check, which then needs no connection. (A no-op
  where the worker already skips it.)
- ``separate``: the worker as it was before it adopted ``complete_and_claim``: a flush only
  writes its batch, and the claim loop claims the freed slots in a statement of its own (two
  round trips and two transactions per batch instead of one).
- ``noprefetch``: the worker as it was before it held a batch beyond ``batchSize``
  (``ANALYSISQ_PREFETCH=false``): the next batch's attempts wait for the statement that
  writes the last batch and claims the next.
"""

from __future__ import annotations

import contextvars
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from analysisq.queue import quota, ratelimit
from analysisq.queue.items import Outcome
from analysisq.worker import Worker
from analysisq.worker.inflight import InFlight, InFlightClaim

WHATIFS = ("noreset", "eager", "norate", "separate", "noprefetch")


async def _no_reset(conn: asyncpg.Connection) -> None:
    """The worker leaves no session state behind: nothing to reset."""
    return None


def pool_options(whatif: frozenset[str]) -> dict[str, Any]:
    return {"reset": _no_reset} if "noreset" in whatif else {}


class _Held(InFlight):
    """The held claims as the claim loop counts them: answered-but-unwritten ones are free
    slots, and fewer than half a batch of free slots count as none."""

    def __init__(self, worker: Worker) -> None:
        super().__init__()
        self._worker = worker

    def __len__(self) -> int:
        size = self._worker.spec.batch_size
        busy = max(0, super().__len__() - len(self._worker.results))
        return size if 0 < size - busy < (size + 1) // 2 else busy


class EagerSlotWorker(Worker):
    """``eager``: the claim loop refills a slot when the provider answers."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.inflight = _Held(self)

    async def _process(self, record: InFlightClaim) -> None:
        await super()._process(record)
        self._slot_freed.set()


#: ``norate``: set while the next acquire of this task is the rate-limit check of an
#: unlimited target, which ``ratelimit.acquire`` answers without touching the connection.
_NO_CONNECTION_NEEDED: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "bench_whatif_no_connection_needed", default=False
)
_production_acquire = getattr(quota, "acquire")  # noqa: B009 (not re-exported by quota)


@asynccontextmanager
async def _acquire(pool: asyncpg.Pool) -> AsyncIterator[Any]:
    if _NO_CONNECTION_NEEDED.get():
        _NO_CONNECTION_NEEDED.set(False)  # only the rate check; later writes get a connection
        yield None
        return
    async with _production_acquire(pool) as conn:
        yield conn


def _no_rate_connection(cls: type[Worker]) -> type[Worker]:
    """``norate``: a subclass of *cls* whose rate check of an unlimited target is free."""

    class NoRateConnectionWorker(cls):  # type: ignore[valid-type,misc]
        async def _process(self, record: InFlightClaim) -> None:
            target = self.spec.targets[0]
            for t in self.spec.targets:
                if t.name == record.item.target:
                    target = t
            _NO_CONNECTION_NEEDED.set(not ratelimit.is_limited(target))
            try:
                await super()._process(record)
            finally:
                _NO_CONNECTION_NEEDED.set(False)

    setattr(quota, "acquire", _acquire)  # noqa: B010 (this benchmark process only)
    return NoRateConnectionWorker


class SeparateClaimWorker(Worker):
    """``separate``: flushes claim nothing; the claim loop does all the claiming."""

    def _refill_slots(self, batch: list[Outcome]) -> int:
        return 0


def _no_prefetch(cls: type[Worker]) -> type[Worker]:
    """``noprefetch``: a subclass of *cls* holding no claim beyond ``batchSize``."""

    class NoPrefetchWorker(cls):  # type: ignore[valid-type,misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.capacity = self.spec.batch_size

    return NoPrefetchWorker


def worker_class(whatif: frozenset[str]) -> type[Worker]:
    unknown = whatif - set(WHATIFS)
    if unknown:
        raise SystemExit(f"unknown what-if {sorted(unknown)}; known: {WHATIFS}")
    if {"eager", "separate"} <= whatif:
        raise SystemExit("what-ifs eager and separate do not combine")
    cls: type[Worker] = Worker
    if "eager" in whatif:
        cls = EagerSlotWorker
    elif "separate" in whatif:
        cls = SeparateClaimWorker
    if "noprefetch" in whatif:
        cls = _no_prefetch(cls)
    return _no_rate_connection(cls) if "norate" in whatif else cls

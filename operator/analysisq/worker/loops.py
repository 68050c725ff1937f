"""The serving loops: the ``Worker`` drains one run's queue until told to stop.

One asyncio process, four loops sharing a small database pool:

- ``_claim_loop`` keeps up to ``batchSize`` attempts running (one task per claim,
  ``attempt``: rate slot -> provider -> verdict) and, with ``prefetch`` (the default), one
  more batch of claims ready beside them, so that the next attempts start while the last
  batch is written instead of after the write's round trip;
- ``Leases.heartbeat_loop`` renews the lease of every held claim every third of a lease, and
  drops the claims whose lease was lost (their late writes would be refused anyway);
- ``_flush_loop`` writes buffered answers in batches (``results``), and in the same statement
  claims the places a batch frees while the claim loop runs;
- ``Leases.rescue_loop`` runs the stuck-item reset for the run every quarter lease (at most
  15 s), so a crashed worker's items come back within about 1.25 leases.

A verdict that is not an answer is a ``Decision`` that ``settle`` hands to
``queue.decisions.apply``, the one call by which the worker changes such an item. Targets in
``mode: batch`` are left to a ``worker.batch.BatchDriver`` running beside these loops (the
sync claim skips them). At start the worker resets its run's stuck items
(``Leases.rescue_at_start``), as the seed's ``process-queue`` did. On stop (SIGTERM) it
claims nothing more and starts no held claim, gives running items
``shutdown_grace_seconds`` to finish, then releases what it still holds, prefetched claims
included (a release is not an attempt) and exits. A worker that dies holds at most
``capacity`` claims (2 x ``batchSize`` with prefetch), back through the rescuer. Which
targets a claim takes (none of a paused one; a rate-limited one only for a place that starts
at once) is ``claim_targets``'; a 401 releases the held claims of its target not started.
``startup.serve`` builds a worker for a process.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import random
import socket
import time
from collections.abc import Callable

import asyncpg
import httpx

from analysisq.completion import Completion
from analysisq.db.connect import acquire
from analysisq.errors import (
    BudgetExhausted,
    DatabaseError,
    redact,
)
from analysisq.providers import BatchClient, make_batch_client, make_provider, resolve_api_key
from analysisq.providers.base import Provider
from analysisq.providers.client import make_http_client
from analysisq.queue import budget, items, runs
from analysisq.queue.decisions import (
    Decision,
    Pause,
    Release,
)
from analysisq.queue.items import ClaimedItem, Outcome
from analysisq.queue.retry import RetryPolicy
from analysisq.queue.runs import Run
from analysisq.settings import Settings
from analysisq.worker.attempt import Attempts
from analysisq.worker.batch import BatchDriver
from analysisq.worker.batch_plan import batch_targets
from analysisq.worker.claim_targets import ClaimTargets
from analysisq.worker.inflight import InFlight, InFlightClaim
from analysisq.worker.leases import Leases
from analysisq.worker.results import Refill, ResultBuffer
from analysisq.worker.settle import Settler, WorkerStats

log = logging.getLogger("analysisq.worker")


def worker_name() -> str:
    """Pod name in Kubernetes (HOSTNAME), host:pid locally."""
    host = os.environ.get("POD_NAME") or socket.gethostname()
    return f"{host}:{os.getpid()}"


class Worker:
    def __init__(
        self,
        pool: asyncpg.Pool,
        run: Run,
        settings: Settings,
        *,
        name: str | None = None,
        providers: dict[str, Provider] | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        exit_when_done: bool = False,
    ) -> None:
        #: Local runs: exit once every item is terminal (pods instead idle until scaled down).
        self.exit_when_done = exit_when_done
        self.pool = pool
        self.run = run
        self.spec = run.spec
        self.settings = settings
        self.name = name or worker_name()
        self.stats = WorkerStats()
        self.policy = RetryPolicy(
            base_seconds=settings.retry_base_seconds,
            cap_seconds=settings.retry_cap_seconds,
            max_deferrals=settings.max_deferrals,
        )
        self._providers = providers
        self._client: httpx.AsyncClient | None = None
        #: Targets in mode batch: their provider Batch API clients (``worker.batch``).
        self._batch_clients: dict[str, BatchClient] = {}
        self._rng = rng or random.Random()
        self._clock = clock
        self._stopping = asyncio.Event()
        self.inflight = InFlight()
        #: The targets the claims skip (batch, paused) and the rate-limited ones.
        self.targets = ClaimTargets(run.id, self.spec, clock, 4 * settings.poll_seconds)
        #: Claims held at most: the running batch, the batch being written or prefetched.
        self.capacity = self.spec.batch_size * (2 if settings.prefetch else 1)
        self.results = ResultBuffer(self.spec.batch_size, self._refill())
        #: While the claim loop runs, flushes claim too (never after it has ended).
        self._claiming = False
        self._slot_freed = asyncio.Event()
        #: Places promised to a claim statement under way (the claim loop's, a flush's): the
        #: two run at once, and each must leave the other's places alone.
        self._claim_out = 0
        self._refill_out = 0
        self._flush_now = asyncio.Event()
        #: Set when the run's budget refused a request: claim nothing until it is raised.
        self._budget_hold = asyncio.Event()
        self.settler = Settler(
            pool,
            self.inflight,
            self.results,
            self.stats,
            self._log,
            self._slot_freed.set,
            self._start_claimed,
        )
        self.leases = Leases(
            pool,
            run.id,
            self.inflight,
            self.settler,
            self.lease,
            float(self.spec.stuck_after_seconds),
            self._rng,
            self._log,
        )

    # -- lifecycle ---------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop claiming; in-flight items finish or are released (idempotent, signal-safe)."""
        self._stopping.set()
        self._slot_freed.set()

    @property
    def lease(self) -> float:
        return float(self.spec.lease_seconds)

    def _log(self, level: int, msg: str, item: ClaimedItem | None = None, **kw: object) -> None:
        extra: dict[str, object] = {"run": self.run.id, "worker": self.name, **kw}
        if item is not None:
            extra |= {"item": item.id, "prompt": item.external_id, "target": item.target}
            extra["attempt"] = item.attempt
        log.log(level, msg, extra=extra)

    async def run_until_stopped(self) -> WorkerStats:
        providers = self._providers or self._make_providers()
        self._providers = providers
        self.attempts = Attempts(
            self.pool, self.spec, providers, self.policy, rng=self._rng, clock=self._clock
        )
        try:
            await self.leases.rescue_at_start()
            self._log(
                logging.INFO,
                "worker started",
                batch_size=self.spec.batch_size,
                capacity=self.capacity,
            )
            async with asyncio.TaskGroup() as tg:
                claim = tg.create_task(self._claim_loop())
                background = [
                    tg.create_task(self.leases.heartbeat_loop()),
                    tg.create_task(self._flush_loop()),
                    tg.create_task(self.leases.rescue_loop()),
                ]
                driving = None
                if self._batch_clients:
                    driver = BatchDriver(
                        self.pool,
                        self.run,
                        self._batch_clients,
                        name=self.name,
                        policy=self.policy,
                        rng=self._rng,
                    )
                    driving = tg.create_task(driver.run_until(self._stopping))
                await claim
                await self._drain()
                if driving is not None:
                    self._stopping.set()  # the driver's last pass, then it returns
                    await driving
                for t in background:
                    t.cancel()
            await self._flush()
        finally:
            if self._client is not None:
                await self._client.aclose()
        self._log(logging.INFO, "worker stopped", **{k: v for k, v in vars(self.stats).items()})
        return self.stats

    def _make_providers(self) -> dict[str, Provider]:
        timeout = max(t.timeout_seconds for t in self.spec.targets)
        self._client = make_http_client(
            timeout_s=timeout, max_connections=max(10, 2 * self.spec.batch_size)
        )
        keys = {t.name: resolve_api_key(t) for t in self.spec.targets}
        self._batch_clients = {
            t.name: make_batch_client(t, self._client, keys[t.name])
            for t in batch_targets(self.spec)
        }
        return {t.name: make_provider(t, self._client, keys[t.name]) for t in self.spec.targets}

    async def _drain(self) -> None:
        """After the claim loop ends: let in-flight items finish within the grace period."""
        pending = self.inflight.tasks()
        if pending:
            _, still = await asyncio.wait(pending, timeout=self.settings.shutdown_grace_seconds)
            for t in still:
                t.cancel()
            if still:
                await asyncio.gather(*still, return_exceptions=True)
        await self._flush()
        for record in self.inflight:
            if record.finishing or self.results.holds(record.item):
                continue
            paused = record.item.target in self.targets.paused
            release = Release("released at shutdown", park=paused)
            await self.settler.settle(record, release, wait_for_db=False)

    # -- claiming ----------------------------------------------------------------------------

    def _refill(self) -> Refill:
        return Refill(
            self.run.id,
            self.name,
            self.lease,
            self._refill_places,
            self._refill_suspects,
        )

    def _refill_places(self, batch: list[Outcome]) -> tuple[int, list[str]]:
        """Claims a flush of *batch* takes (the places its written claims free) and the
        targets it skips."""
        if not self._claiming or self._stopping.is_set() or self._budget_hold.is_set():
            return 0, []
        held = sum(1 for o in batch if self.inflight.get(o.item) is not None)
        free = self.capacity - len(self.inflight) - self._claim_out
        places, skip = self.targets.places(max(0, free + held), self._startable(self._claim_out))
        self._refill_out = places
        return places, skip

    def _startable(self, promised: int) -> int:
        """Claims that could start an attempt at once, besides *promised* ones on the way."""
        waiting = len(self.inflight.waiting())
        return self.spec.batch_size - self.inflight.running - waiting - promised

    def _refill_suspects(self, batch: list[Outcome]) -> int:
        """One suspect at a time, as the claim loop: none while one outside *batch* is held."""
        writing = {o.item.key for o in batch}
        held = any(i.suspect and i.key not in writing for i in self.inflight.items())
        return 0 if held else 1

    def _start_claimed(self, claimed: list[ClaimedItem]) -> None:
        self.stats.claimed += len(claimed)
        for item in claimed:
            self._start(item)

    async def _claim_loop(self) -> None:
        self._claiming = True
        try:
            await self._claim_until_stopped()
        finally:
            self._claiming = False

    async def _claim_until_stopped(self) -> None:
        while not self._stopping.is_set():
            if self._budget_hold.is_set():
                await self._wait_for_budget()
                continue
            await self.targets.refresh(self.pool)
            free = self.capacity - len(self.inflight) - self._refill_out
            free, skip = self.targets.places(
                min(self.spec.batch_size, free), self._startable(self._refill_out)
            )
            if free <= 0:
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            self._claim_out = free
            try:
                async with acquire(self.pool) as conn:
                    claimed = await items.claim(
                        conn,
                        self.run.id,
                        worker=self.name,
                        limit=free,
                        lease_seconds=self.lease,
                        max_suspects=0 if self.inflight.holds_suspect() else 1,
                        skip_targets=skip,
                    )
            except DatabaseError as exc:
                self._log(logging.WARNING, "claim failed; retrying", error=exc.message)
                await self._sleep(self._poll_delay() * 4)
                continue
            finally:
                self._claim_out = 0
            if not claimed:
                if self.exit_when_done and not len(self.inflight) and await self._run_done():
                    self._log(logging.INFO, "run complete; worker exits")
                    break
                await self._sleep(self._poll_delay())
                continue
            self._start_claimed(claimed)

    def _start(self, item: ClaimedItem) -> None:
        record, stale = self.inflight.add(item)
        if stale is not None:
            # The rescuer took the item from us (we stalled) and we claimed it again: the old
            # claim is lost and its task must not write, nor touch the new claim.
            self.settler.abandon(stale, "lease lost; item claimed again")
        if item.target in self.targets.paused:
            self._park(record)  # a claim made while the pause was on its way to us
            return
        self.inflight.queue(record)
        self._run_ready()

    def _target_paused(self, target: str) -> None:
        """The provider refused our credentials for *target*: the claims of it still waiting
        to start go back unspent and parked (``Release(park=True)``) instead of meeting the
        same refusal, and the claims skip it until it is resumed."""
        self.targets.pause(target)
        for record in self.inflight.waiting():
            if record.item.target == target:
                self._park(record)

    def _park(self, record: InFlightClaim) -> None:
        # A task of its own, so that ``next_ready`` never starts the claim and the drain
        # waits for its write; the heartbeat renews the lease until the release is written.
        record.task = asyncio.create_task(self._release_parked(record))

    async def _release_parked(self, record: InFlightClaim) -> None:
        release = Release("released unspent: its target is paused", park=True)
        try:
            await self.settler.settle(record, release)
        except Exception as exc:  # a bug in analysisq: never hold the claim for ever
            self._log(logging.ERROR, "unexpected error; item left to its lease", record.item,
                      error=redact(repr(exc)))  # fmt: skip
            if self.inflight.get(record.item) is record:
                self.settler.forget(record)

    def _run_ready(self) -> None:
        """Start held claims while fewer than ``batchSize`` attempts run; none once stopping
        (a claim not started is released at shutdown, unspent)."""
        while not self._stopping.is_set() and self.inflight.running < self.spec.batch_size:
            record = self.inflight.next_ready()
            if record is None:
                return
            self.inflight.started(record)
            record.task = asyncio.create_task(self._process(record))
            # Also when the task is cancelled before it ran a line of ``_process``.
            record.task.add_done_callback(functools.partial(self._task_done, record))

    def _task_done(self, record: InFlightClaim, _: asyncio.Task[None]) -> None:
        self._attempt_ended(record)

    def _attempt_ended(self, record: InFlightClaim) -> None:
        if self.inflight.ended(record):
            self._run_ready()
            if self.targets.limited:
                self._slot_freed.set()  # a claim of a limited target may start now

    async def _wait_for_budget(self) -> None:
        await self._sleep(self._poll_delay() * 4)
        try:
            async with acquire(self.pool) as conn:
                state = await budget.state(conn, self.run.id)
        except DatabaseError:
            return
        if state is None or not state.exhausted:
            self._log(logging.INFO, "budget raised; claiming again")
            self._budget_hold.clear()

    async def _run_done(self) -> bool:
        try:
            async with acquire(self.pool) as conn:
                return (await runs.counts(conn, self.run.id)).done
        except DatabaseError:
            return False

    def _poll_delay(self) -> float:
        return self.settings.poll_seconds * self._rng.uniform(0.5, 1.5)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)

    # -- one claim ---------------------------------------------------------------------------

    async def _process(self, record: InFlightClaim) -> None:
        item = record.item
        try:
            try:
                try:
                    verdict: Completion | Decision = await self.attempts.run(item)
                    if isinstance(verdict, Pause):
                        # Before its slot is free: no waiting claim of the target starts.
                        self._target_paused(item.target)
                finally:
                    self._attempt_ended(record)  # its write no longer holds a running slot
            except DatabaseError as exc:
                # The database failed us, not the item: give it back unspent once we can.
                self._log(logging.WARNING, "releasing item", item, error=exc.message)
                verdict = Release("released after a database error")
            except BudgetExhausted as exc:
                # Not the item's fault: back unspent, and claim nothing until it is raised.
                self._budget_hold.set()
                self._log(
                    logging.WARNING, "budget exhausted; releasing item", item, error=exc.message
                )
                verdict = Release(exc.message)
            if isinstance(verdict, Completion):
                if self.inflight.get(item) is record and self.results.add(Outcome(item, verdict)):
                    self._flush_now.set()
                return
            await self.settler.settle(record, verdict)
        except Exception as exc:  # a bug in analysisq: never hold the claim for ever
            self._log(
                logging.ERROR,
                "unexpected error; item left to its lease",
                item,
                error=redact(repr(exc)),
            )
            if self.inflight.get(item) is record:
                self.settler.forget(record)

    # -- background loops --------------------------------------------------------------------

    async def _flush(self) -> None:
        try:
            await self.settler.write_results()
        finally:
            self._refill_out = 0  # its claims are held now, or there are none

    async def _flush_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._flush_now.wait(), timeout=0.05)
            self._flush_now.clear()
            await self._flush()

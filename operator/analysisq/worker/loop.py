"""The worker: drains one run's queue until told to stop.

One asyncio process, four loops sharing a small database pool:

- ``_claim_loop`` keeps up to ``batchSize`` items in flight: it claims as many as there are
  free slots and starts one task per item (rate slot -> provider -> outcome);
- ``_heartbeat_loop`` renews the lease of every held item every third of a lease, and drops
  the items whose lease was lost (their late writes would be refused anyway);
- ``_flush_loop`` writes completed results in batches (one fenced statement per batch);
- ``_housekeeping_loop`` runs the stuck-item reset for the run every quarter lease (at most
  15 s), so a crashed worker's items come back within about 1.25 leases.

At start the worker resets its run's stuck items, as the seed's ``process-queue`` did. On stop
(SIGTERM) it claims nothing more, gives in-flight items ``shutdown_grace_seconds`` to finish,
then releases what it still holds (a release is not an attempt) and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import asyncpg
import httpx

from analysisq.db.connect import acquire
from analysisq.errors import (
    DatabaseError,
    DatabaseUnavailable,
    ErrorClass,
    InvalidInput,
    ProviderError,
    RateLimited,
    SpecError,
    TransientError,
    redact,
)
from analysisq.providers import make_provider, resolve_api_key
from analysisq.providers.base import Provider
from analysisq.providers.client import make_http_client
from analysisq.queue import items, ratelimit, rescue, runs
from analysisq.queue.items import ClaimedItem, Outcome
from analysisq.queue.retry import Action, RetryPolicy
from analysisq.queue.runs import Run
from analysisq.settings import Settings

log = logging.getLogger("analysisq.worker")


def worker_name() -> str:
    """Pod name in Kubernetes (HOSTNAME), host:pid locally."""
    host = os.environ.get("POD_NAME") or socket.gethostname()
    return f"{host}:{os.getpid()}"


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
        self._rng = rng or random.Random()
        self._clock = clock
        self._stopping = asyncio.Event()
        self._held: dict[int, ClaimedItem] = {}
        #: Items whose final write (complete, fail, release) is under way: a heartbeat that
        #: does not renew them has not lost them.
        self._finishing: set[int] = set()
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._outcomes: list[Outcome] = []
        self._slot_freed = asyncio.Event()
        self._flush_now = asyncio.Event()
        self._local_backoff: dict[str, float] = {}

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
        try:
            async with acquire(self.pool) as conn:
                res = await rescue.cleanup_stuck(conn, self.run.id, self.spec.stuck_after_seconds)
            if res.reset or res.poisoned:
                self._log(logging.WARNING, "reset stuck items at start", **vars(res))
            self._log(logging.INFO, "worker started", batch_size=self.spec.batch_size)
            async with asyncio.TaskGroup() as tg:
                claim = tg.create_task(self._claim_loop())
                background = [
                    tg.create_task(self._heartbeat_loop()),
                    tg.create_task(self._flush_loop()),
                    tg.create_task(self._housekeeping_loop()),
                ]
                await claim
                await self._drain()
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
        return {
            t.name: make_provider(t, self._client, resolve_api_key(t)) for t in self.spec.targets
        }

    async def _drain(self) -> None:
        """After the claim loop ends: let in-flight items finish within the grace period."""
        pending = list(self._tasks.values())
        if pending:
            _, still = await asyncio.wait(pending, timeout=self.settings.shutdown_grace_seconds)
            for t in still:
                t.cancel()
            if still:
                await asyncio.gather(*still, return_exceptions=True)
        await self._flush()
        leftover = [i for i in self._held.values() if i.id not in self._done_ids()]
        for item in leftover:
            try:
                await self._release(item, message="released at shutdown")
            except DatabaseError:
                # Nothing is lost: the lease expires and the rescuer requeues the item.
                self._log(logging.WARNING, "could not release; left to its lease", item)

    def _done_ids(self) -> set[int]:
        return {o.item.id for o in self._outcomes}

    # -- claiming ----------------------------------------------------------------------------

    async def _claim_loop(self) -> None:
        concurrency = self.spec.batch_size
        while not self._stopping.is_set():
            free = concurrency - len(self._held)
            if free <= 0:
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            try:
                async with acquire(self.pool) as conn:
                    claimed = await items.claim(
                        conn,
                        self.run.id,
                        worker=self.name,
                        limit=free,
                        lease_seconds=self.lease,
                        max_attempts=self.spec.max_attempts,
                    )
            except DatabaseError as exc:
                self._log(logging.WARNING, "claim failed; database error", error=exc.message)
                await self._sleep(self._poll_delay() * 4)
                continue
            if not claimed:
                if self.exit_when_done and not self._held and await self._run_done():
                    self._log(logging.INFO, "run complete; worker exits")
                    break
                await self._sleep(self._poll_delay())
                continue
            self.stats.claimed += len(claimed)
            for item in claimed:
                self._held[item.id] = item
                self._tasks[item.id] = asyncio.create_task(self._process(item))

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

    # -- one item ----------------------------------------------------------------------------

    async def _process(self, item: ClaimedItem) -> None:
        try:
            await self._attempt(item)
        except asyncio.CancelledError:
            # shutdown past the grace period: _drain releases what is still held
            raise
        except DatabaseError as exc:
            # The database failed us, not the item: give it back unspent once we can.
            self._log(logging.WARNING, "database error; releasing item", item, error=exc.message)
            await self._release_when_possible(item)
        except Exception as exc:  # a bug in analysisq: count it as a transient failure
            self._log(logging.ERROR, "unexpected error", item, error=redact(repr(exc)))
            err = TransientError(f"internal error: {redact(repr(exc))}")
            try:
                await self._handle_error(item, err)
            except DatabaseError:
                await self._release_when_possible(item)
        finally:
            self._tasks.pop(item.id, None)

    async def _release_when_possible(self, item: ClaimedItem) -> None:
        """Release *item* (not an attempt), retrying while the database is away.

        The item stays held meanwhile, so the heartbeat keeps its lease once the database is
        back; an outage is not counted as a lost lease against the item.
        """
        delay = 0.5
        while item.id in self._held:
            try:
                await self._release(item, message="released after a database error")
                return
            except DatabaseError as exc:
                self._log(logging.WARNING, "release failed; retrying", item, error=exc.message)
                self._finishing.discard(item.id)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def _attempt(self, item: ClaimedItem) -> None:
        try:
            target = self.spec.target(item.target)
        except SpecError as exc:
            # The run's spec lost this target after the fill: no retry can send it anywhere.
            await self._fail(item, ErrorClass.PERMANENT, f"item {item.id}: {exc.message}", None)
            self.stats.failed += 1
            return
        if len(item.text) > self.spec.max_prompt_chars:
            err = InvalidInput(
                f"prompt {item.external_id!r} has {len(item.text)} characters;"
                f" the limit is {self.spec.max_prompt_chars}"
            )
            await self._handle_error(item, err)
            return
        await self._wait_local_backoff(item.target)
        if ratelimit.is_limited(target):
            async with acquire(self.pool) as conn:
                wait = await ratelimit.acquire(conn, self.run.id, target, item.text)
            if wait > 0:
                await asyncio.sleep(wait)
        assert self._providers is not None
        try:
            completion = await self._providers[item.target].complete(item.text)
        except ProviderError as err:
            await self._handle_error(item, err)
            return
        self._outcomes.append(Outcome(item, completion))
        if len(self._outcomes) >= self.spec.batch_size:
            self._flush_now.set()

    async def _wait_local_backoff(self, target: str) -> None:
        until = self._local_backoff.get(target, 0.0)
        now = self._clock()
        if until > now:
            await asyncio.sleep(until - now)

    async def _handle_error(self, item: ClaimedItem, err: ProviderError) -> None:
        d = self.policy.decide(
            err,
            attempt=item.attempt,
            max_attempts=self.spec.max_attempts,
            deferrals=item.deferrals,
            rng=self._rng,
        )
        self._log(logging.INFO, f"item {d.action}", item, error_class=str(d.error_class),
                  error=d.message, delay=d.delay)  # fmt: skip
        if d.action is Action.RETRY:
            self.stats.retried += 1
            await self._fail(item, d.error_class, d.message, d.delay)
        elif d.action is Action.FAIL:
            self.stats.failed += 1
            await self._fail(item, d.error_class, d.message, None)
        elif d.action is Action.DEFER:
            self.stats.deferred += 1
            delay = d.delay or 0.0
            if isinstance(err, RateLimited):
                self._local_backoff[item.target] = self._clock() + (err.delay or 0.0)
                if ratelimit.is_limited(self.spec.target(item.target)) and err.delay:
                    async with acquire(self.pool) as conn:
                        await ratelimit.backoff(conn, self.run.id, item.target, err.delay)
            await self._release(item, delay=delay, deferral=True, error_class=d.error_class,
                                message=d.message)  # fmt: skip
        else:
            async with acquire(self.pool) as conn:
                paused = await runs.pause_target(conn, self.run.id, item.target, d.message)
            if paused:
                self._log(logging.ERROR, "target paused for the run: provider refused our "
                          "credentials", item, error=d.message)  # fmt: skip
            self.stats.paused_targets.add(item.target)
            await self._release(item, error_class=d.error_class, message=d.message, park=True)

    async def _fail(
        self, item: ClaimedItem, cls: ErrorClass, message: str, retry_in: float | None
    ) -> None:
        self._finishing.add(item.id)
        async with acquire(self.pool) as conn:
            ok = await items.fail(conn, item, cls, message, retry_in)
        self._after_write(item, ok)

    async def _release(
        self,
        item: ClaimedItem,
        *,
        delay: float = 0.0,
        deferral: bool = False,
        error_class: ErrorClass | None = None,
        message: str | None = None,
        park: bool = False,
    ) -> None:
        self._finishing.add(item.id)
        async with acquire(self.pool) as conn:
            ok = await items.release(
                conn, item, delay=delay, deferral=deferral, error_class=error_class,
                message=message, park=park,
            )  # fmt: skip
        if ok and not deferral:
            self.stats.released += 1
        self._after_write(item, ok)

    def _after_write(self, item: ClaimedItem, applied: bool) -> None:
        if not applied:
            self.stats.lost += 1
            self._log(logging.WARNING, "lease lost; write refused", item)
        self._forget(item)

    def _forget(self, item: ClaimedItem) -> None:
        self._held.pop(item.id, None)
        self._finishing.discard(item.id)
        self._slot_freed.set()

    # -- background loops --------------------------------------------------------------------

    async def _flush(self) -> None:
        if not self._outcomes:
            return
        batch, self._outcomes = self._outcomes, []
        self._finishing.update(o.item.id for o in batch)
        try:
            async with acquire(self.pool) as conn:
                written = await items.complete(conn, batch)
        except DatabaseUnavailable as exc:
            # Keep them: the lease is still renewed and the next flush retries the write.
            self._requeue_outcomes(batch)
            self._log(logging.WARNING, "results not written yet", error=exc.message)
            return
        except DatabaseError as exc:
            # A value the database refuses must not sink the whole batch: one by one.
            self._log(logging.WARNING, "batch of results refused; writing one by one",
                      error=exc.message)  # fmt: skip
            written = await self._complete_one_by_one(batch)
        for o in batch:
            if o.item.id in written:
                self.stats.completed += 1
                self._forget(o.item)
            elif o.item.id in self._held and o.item.id in self._finishing:
                self._after_write(o.item, False)

    def _requeue_outcomes(self, batch: list[Outcome]) -> None:
        self._outcomes = batch + self._outcomes
        self._finishing.difference_update(o.item.id for o in batch)

    async def _complete_one_by_one(self, batch: list[Outcome]) -> set[int]:
        written: set[int] = set()
        for o in batch:
            try:
                async with acquire(self.pool) as conn:
                    written |= await items.complete(conn, [o])
            except DatabaseUnavailable:
                self._requeue_outcomes([o])
            except DatabaseError as exc:
                # This answer cannot be stored; another attempt gets another answer.
                self._finishing.discard(o.item.id)
                err = TransientError(f"the result could not be stored: {exc.message}")
                try:
                    await self._handle_error(o.item, err)
                except DatabaseError:
                    task = asyncio.create_task(self._release_when_possible(o.item))
                    self._tasks[o.item.id] = task
        return written

    async def _flush_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._flush_now.wait(), timeout=0.05)
            self._flush_now.clear()
            await self._flush()

    async def _heartbeat_loop(self) -> None:
        # Renewals also touch updated_at: beating at least three times per stuck threshold
        # (and per the seed's 10-minute stuck query) keeps a live claim from looking stuck.
        interval = min(self.lease, float(self.spec.stuck_after_seconds), 600.0) / 3
        while True:
            await asyncio.sleep(interval)
            held = list(self._held.values())
            if not held:
                continue
            try:
                async with acquire(self.pool) as conn:
                    kept = await items.heartbeat(conn, held, self.lease)
            except DatabaseError as exc:
                self._log(logging.WARNING, "heartbeat failed", error=exc.message)
                continue
            for item in held:
                current = self._held.get(item.id)
                if item.id not in kept and current is item and item.id not in self._finishing:
                    # Someone else owns it now; stop working on it, write nothing.
                    self.stats.lost += 1
                    self._log(logging.WARNING, "lease lost; abandoning item", item)
                    task = self._tasks.pop(item.id, None)
                    if task is not None:
                        task.cancel()
                    self._outcomes = [o for o in self._outcomes if o.item.id != item.id]
                    self._forget(item)

    async def _housekeeping_loop(self) -> None:
        # A dead worker's lease runs out at most one lease after its last heartbeat; checking
        # every quarter lease (at most 15 s) brings its items back within about 1.25 leases.
        period = min(self.lease / 4, 15.0)
        while True:
            await asyncio.sleep(period * self._rng.uniform(0.8, 1.2))
            try:
                async with acquire(self.pool) as conn:
                    res = await rescue.cleanup_stuck(
                        conn, self.run.id, self.spec.stuck_after_seconds
                    )
            except DatabaseError:
                continue
            if res.reset or res.poisoned:
                self._log(logging.WARNING, "reset stuck items", **vars(res))

"""The batch driver: a worker's loop for its run's ``mode: batch`` targets.

Every worker may run one (no extra Deployment); drivers share the work through the database
alone. Each round, a driver

1. takes the submissions it should work on (``queue.batches.take``: its own that are due for
   a poll, and any whose lease expired because its owner died) and advances each: an
   ``intent`` is reconciled with the provider (``find``: a crash between the POST and its
   commit never pays twice) and sent only if the provider has none; a ``submitted`` one is
   polled, cancelled if asked to (suspend, delete, deadline) and, once ended, ingested
   (``batch_results.ingest``) and finished (items with no answer go back unspent);
2. claims a new submission per batch target (``queue.batches.claim``: intent and items in one
   commit, up to ``batch.maxRequests``), cuts it to ``batch.maxBytes`` and sends it;
3. renews its submissions' leases every quarter lease and touches their waiting items
   every ``TOUCH_SECONDS``, so none of them looks stuck and none is rescued.

On its way out a driver calls ``/cancel`` for what a suspend marked and hands its
submissions over (their leases end). ``drain`` is the pass for a run being deleted: it
cancels and ingests without claiming, until no submission is open (the operator's
finalizer calls it; ``queue.runs.delete_run`` refuses while one is).

A whole-batch refusal for the provider's enqueued-token limit (``RateLimited``) is
back-pressure: the items go back unspent and the target sends no batch for the delay. Once a
run's ``deadline`` is near, the driver cancels its open batches and stops claiming: the sync
path (``sync_targets_skipped``) serves what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime

import asyncpg

from analysisq.db.connect import acquire
from analysisq.errors import (
    AuthError,
    DatabaseError,
    ProviderError,
    RateLimited,
    TransientError,
)
from analysisq.providers.batch import BatchClient
from analysisq.queue import batches, budget, items, runs
from analysisq.queue.batches import Submission
from analysisq.queue.items import ClaimedItem
from analysisq.queue.retry import RetryPolicy
from analysisq.queue.runs import Run
from analysisq.spec import Target
from analysisq.worker import batch_budget
from analysisq.worker.batch_plan import batch_targets, fit, past_margin, sync_targets_skipped
from analysisq.worker.batch_results import IngestReport, fail_all, ingest

log = logging.getLogger("analysisq.worker.batch")

#: Waiting items are touched this often: well inside the seed's 10-minute "stuck" query.
TOUCH_SECONDS = 120.0
#: Their lease: three touches, so one missed touch (a slow database) is not a lost lease.
ITEM_LEASE_SECONDS = 3 * TOUCH_SECONDS
#: Back-pressure after a refusal that named no delay.
BACK_PRESSURE_SECONDS = 60.0

#: A test's hook into the driver's steps ("before_post", "after_post", "ingesting").
StepHook = Callable[[str], Awaitable[None]]


class BatchDriver:
    """Drives the batch targets of one run for one worker (see the module docstring)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        run: Run,
        clients: Mapping[str, BatchClient],
        *,
        name: str,
        policy: RetryPolicy,
        rng: random.Random | None = None,
        step: StepHook | None = None,
        idle_seconds: float = 1.0,
        touch_seconds: float = TOUCH_SECONDS,
    ) -> None:
        self.pool = pool
        self.run = run
        self.spec = run.spec
        self.clients = dict(clients)
        self.name = name
        self.policy = policy
        self._rng = rng or random.Random()
        self._step = step
        self._idle = idle_seconds
        self._touch_every = touch_seconds
        self._owned: set[int] = set()
        self._touched: dict[int, float] = {}
        self._cancelled: set[int] = set()
        #: Monotonic time before which a target sends no new batch (back-pressure).
        self._hold_until: dict[str, float] = {}
        self.reports: list[IngestReport] = []

    @property
    def lease(self) -> float:
        return float(self.spec.lease_seconds)

    async def run_until(self, stopping: asyncio.Event) -> None:
        """Work until *stopping* is set; submissions left open are adopted by others."""
        beat = asyncio.create_task(self._heartbeat_loop())
        try:
            while not stopping.is_set():
                try:
                    busy = await self.round()
                except DatabaseError as exc:
                    log.warning(
                        "batch round failed", extra={"run": self.run.id, "error": exc.message}
                    )
                    busy = False
                if not busy:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stopping.wait(), self._idle)
            await self._cancel_marked()
            await self._hand_over()
        finally:
            beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beat

    async def _cancel_marked(self) -> None:
        """On the way out: cancel at the provider the submissions marked for it (a suspend
        marks them before it scales the workers down); whoever takes them next ingests."""
        try:
            async with acquire(self.pool) as conn:
                taken = await batches.take(
                    conn, self.run.id, worker=self.name, lease_seconds=self.lease
                )
            for sub in taken:
                self._owned.add(sub.id)
                if sub.cancel_reason and sub.provider_batch_id and sub.id not in self._cancelled:
                    await self.clients[sub.target].cancel(sub.provider_batch_id)
                    self._cancelled.add(sub.id)
                    log.info("batch cancelled", extra=self._extra(sub.id, reason=sub.cancel_reason))
        except (DatabaseError, ProviderError) as exc:
            log.warning(
                "could not cancel marked batches", extra={"run": self.run.id, "error": exc.message}
            )

    async def _hand_over(self) -> None:
        """On the way out: end the leases of the submissions still ours, so whoever comes next
        (a worker, or the operator cancelling a deleted run's batches) takes them at once."""
        try:
            async with acquire(self.pool) as conn:
                await batches.release_leases(conn, sorted(self._owned), worker=self.name)
        except DatabaseError as exc:
            log.warning(
                "could not hand over batch submissions; their leases will expire",
                extra={"run": self.run.id, "error": exc.message},
            )
        self._owned.clear()

    async def drain(self, reason: str) -> int:
        """One pass for a run that is going away (delete): mark every open submission for
        cancelling (*reason*), claim nothing, and advance those it can take now: cancel at
        the provider, ingest what ended (partial results), put the rest back unspent.
        Returns how many submissions are still open; call again until none is."""
        async with acquire(self.pool) as conn:
            await batches.cancel_open(conn, self.run.id, reason)
            taken = await batches.take(
                conn, self.run.id, worker=self.name, lease_seconds=self.lease
            )
        for sub in taken:
            self._owned.add(sub.id)
            await self._advance(sub)
        async with acquire(self.pool) as conn:
            return len(await batches.open_batches(conn, self.run.id))

    async def round(self) -> bool:
        """One pass (take, advance, claim); True if it did anything."""
        busy = False
        if self.spec.deadline is not None and past_margin(self.spec, datetime.now(UTC)):
            async with acquire(self.pool) as conn:
                await batches.cancel_open(conn, self.run.id, "deadline")
        async with acquire(self.pool) as conn:
            taken = await batches.take(
                conn, self.run.id, worker=self.name, lease_seconds=self.lease
            )
        for sub in taken:
            self._owned.add(sub.id)
            await self._advance(sub)
            busy = True
        if not sync_targets_skipped(self.spec) or await self._budget_exhausted():
            return busy
        for target in batch_targets(self.spec):
            if time.monotonic() < self._hold_until.get(target.name, 0.0):
                continue
            busy |= await self._claim_and_send(target)
        return busy

    async def _budget_exhausted(self) -> bool:
        """The run is paused for its budget: no new batch until the budget is raised."""
        if self.spec.budget is None:
            return False
        async with acquire(self.pool) as conn:
            state = await budget.state(conn, self.run.id)
        return state is not None and state.exhausted

    # -- sending ------------------------------------------------------------------------------

    async def _claim_and_send(self, target: Target) -> bool:
        async with acquire(self.pool) as conn:
            sub_id, claimed = await batches.claim(
                conn,
                self.run.id,
                target.name,
                worker=self.name,
                limit=target.batch.max_requests,
                lease_seconds=self.lease,
                item_lease_seconds=ITEM_LEASE_SECONDS,
            )
        if sub_id is None:
            return False
        self._owned.add(sub_id)
        self._touched[sub_id] = time.monotonic()
        await self._send(sub_id, target, claimed)
        return True

    async def _send(self, sub_id: int, target: Target, claimed: list[ClaimedItem]) -> None:
        client = self.clients[target.name]
        plan = fit(client, target, claimed)
        async with acquire(self.pool) as conn:
            for item, refusal in plan.refused:
                await items.fail(conn, item, refusal.error_class, refusal.message, None)
            for item in plan.spill:
                await items.release(conn, item)
        entries = plan.entries
        if not entries:
            await self._finish(sub_id, target.name, "nothing to send")
            return
        if self.spec.budget is not None:
            fits = await batch_budget.reserve(
                self.pool, self.run.id, sub_id, worker=self.name, target=target, sent=plan.sent
            )
            if not fits:
                await self._finish(sub_id, target.name, "not sent: the run's budget is exhausted")
                return
            entries = entries[:fits]
        await self._hook("before_post")
        try:
            provider_id = await client.submit(entries, self._metadata(sub_id))
        except RateLimited as exc:
            await self._back_pressure(sub_id, target.name, exc)
            return
        except AuthError as exc:
            await self._finish(sub_id, target.name, f"refused: {exc.message}")
            async with acquire(self.pool) as conn:
                await runs.pause_target(conn, self.run.id, target.name, exc.message)
            return
        except TransientError as exc:
            # It may have been created anyway (a timeout): leave the intent to reconcile.
            log.warning(
                "batch submit failed; will reconcile", extra=self._extra(sub_id, error=exc.message)
            )
            return
        except ProviderError as exc:
            report = await fail_all(
                self.pool,
                self.run.id,
                sub_id,
                TransientError(f"the provider refused the batch: {exc.message}"),
                policy=self.policy,
                rng=self._rng,
            )
            await self._finish(sub_id, target.name, f"refused: {exc.message}; {report.line()}")
            return
        await self._hook("after_post")
        async with acquire(self.pool) as conn:
            ok = await batches.submitted(
                conn,
                sub_id,
                worker=self.name,
                provider_batch_id=provider_id,
                poll_in=target.batch.poll_seconds,
            )
        if not ok:
            log.error(
                "batch sent but its submission is no longer ours; its new owner will "
                "find it by reconciliation",
                extra=self._extra(sub_id, batch=provider_id),
            )
        log.info(
            "batch submitted", extra=self._extra(sub_id, batch=provider_id, items=len(entries))
        )

    async def _back_pressure(self, sub_id: int, target: str, exc: RateLimited) -> None:
        delay = exc.delay or BACK_PRESSURE_SECONDS
        self._hold_until[target] = time.monotonic() + delay
        log.warning(
            "provider refused a batch: back-pressure",
            extra=self._extra(sub_id, error=exc.message, delay=delay),
        )
        await self._finish(sub_id, target, f"back-pressure: {exc.message}", release_in=delay)

    # -- advancing a taken submission ---------------------------------------------------------

    async def _advance(self, sub: Submission) -> None:
        target = self.spec.target(sub.target)
        client = self.clients[sub.target]
        if sub.state == "intent":
            await self._reconcile(sub, target, client)
            return
        assert sub.provider_batch_id is not None
        await self._touch_if_due(sub.id)
        try:
            if sub.cancel_reason and sub.id not in self._cancelled:
                await client.cancel(sub.provider_batch_id)
                self._cancelled.add(sub.id)
            state = await client.poll(sub.provider_batch_id)
        except ProviderError as exc:
            # 404 just after create, 5xx, timeouts: ask again at the next poll.
            log.warning(
                "batch poll failed; will retry", extra=self._extra(sub.id, error=exc.message)
            )
            async with acquire(self.pool) as conn:
                await batches.polled(
                    conn,
                    sub.id,
                    worker=self.name,
                    status="poll failed",
                    counts={},
                    poll_in=target.batch.poll_seconds,
                )
            return
        if state.phase == "open":
            async with acquire(self.pool) as conn:
                await batches.polled(
                    conn,
                    sub.id,
                    worker=self.name,
                    status=state.status,
                    counts=state.counts,
                    poll_in=target.batch.poll_seconds,
                )
            return
        if state.phase == "failed":
            failure = state.failure or TransientError("the batch failed without a reason")
            if isinstance(failure, RateLimited):
                await self._back_pressure(sub.id, sub.target, failure)
                return
            report = await fail_all(
                self.pool,
                self.run.id,
                sub.id,
                TransientError(failure.message),
                policy=self.policy,
                rng=self._rng,
            )
            await self._finish(sub.id, sub.target, f"failed: {failure.message}; {report.line()}")
            return
        await self._hook("ingesting")
        report = await ingest(
            self.pool,
            self.run.id,
            sub.id,
            client,
            state,
            policy=self.policy,
            rng=self._rng,
            step=self._step,
            budgeted=self.spec.budget is not None,
        )
        self.reports.append(report)
        await self._finish(sub.id, sub.target, f"{state.status}: {report.line()}")

    async def _reconcile(self, sub: Submission, target: Target, client: BatchClient) -> None:
        """An intent whose sender died (or timed out): adopt the batch it may have created,
        else send it now."""
        async with acquire(self.pool) as conn:
            known = await batches.known_ids(conn, self.run.id, sub.target)
        try:
            found = await client.find(
                self._metadata(sub.id), since=sub.created_at, count=sub.item_count, known=known
            )
        except ProviderError as exc:
            log.warning(
                "batch reconciliation failed; will retry",
                extra=self._extra(sub.id, error=exc.message),
            )
            return
        if found is not None:
            async with acquire(self.pool) as conn:
                await batches.submitted(
                    conn, sub.id, worker=self.name, provider_batch_id=found, poll_in=0.0
                )
            log.info("adopted a batch sent before a crash", extra=self._extra(sub.id, batch=found))
            return
        if sub.cancel_reason:
            await self._finish(sub.id, sub.target, f"not sent: {sub.cancel_reason}")
            return
        async with acquire(self.pool) as conn:
            waiting = await batches.waiting_items(conn, sub.id, with_text=True)
        await self._send(sub.id, target, waiting)

    # -- leases -------------------------------------------------------------------------------

    async def _finish(
        self, sub_id: int, target: str, outcome: str, *, release_in: float = 0.0
    ) -> None:
        """End the submission (its items without an answer back unspent) and give back its
        budget reservation, in one transaction."""
        reason = outcome if release_in else None
        async with acquire(self.pool) as conn, conn.transaction():
            finished = await batches.finish(
                conn,
                sub_id,
                worker=self.name,
                outcome=outcome,
                release_in=release_in,
                reason=reason,
            )
            if finished is not None:
                await batch_budget.release(conn, self.run.id, target, finished.reserved)
        self._owned.discard(sub_id)
        self._touched.pop(sub_id, None)
        log.info(
            "batch submission finished",
            extra=self._extra(
                sub_id, outcome=outcome, released=finished.released if finished else None
            ),
        )

    async def _touch_if_due(self, sub_id: int) -> None:
        if time.monotonic() - self._touched.get(sub_id, 0.0) < self._touch_every:
            return
        async with acquire(self.pool) as conn:
            await batches.touch_items(
                conn, sub_id, worker=self.name, lease_seconds=ITEM_LEASE_SECONDS
            )
        self._touched[sub_id] = time.monotonic()

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.lease / 4)
            owned = sorted(self._owned)
            try:
                async with acquire(self.pool) as conn:
                    kept = await batches.heartbeat(
                        conn, owned, worker=self.name, lease_seconds=self.lease
                    )
                for sub_id in kept:
                    await self._touch_if_due(sub_id)
            except DatabaseError as exc:
                log.warning(
                    "batch heartbeat failed", extra={"run": self.run.id, "error": exc.message}
                )
                continue
            for lost in set(owned) - kept:
                self._owned.discard(lost)
                self._touched.pop(lost, None)

    def _metadata(self, sub_id: int) -> dict[str, str]:
        return {"analysisq_run": self.run.id[:512], "analysisq_submission": str(sub_id)}

    def _extra(self, sub_id: int, **kw: object) -> dict[str, object]:
        return {"run": self.run.id, "worker": self.name, "submission": sub_id, **kw}

    async def _hook(self, step: str) -> None:
        if self._step is not None:
            await self._step(step)

"""The batch driver: a worker's loop for its run's ``mode: batch`` targets.

Every worker may run one (no extra Deployment); drivers share the work through the database
alone. Each round, a driver

1. takes the submissions it should work on (``queue.batches.take``: its own that are due for
   a poll, and any whose lease expired because its owner died) and advances each: an
   ``intent`` is reconciled with the provider (``find``: a crash between the POST and its
   commit never pays twice) and sent only if the provider has none; a ``submitted`` one is
   polled, cancelled if asked to (suspend, delete, deadline) and, once ended, ingested
   (``batch_results.ingest``) and finished (items with no answer go back unspent);
2. claims a new submission per batch target and sends it (``batch_send``);
3. renews its submissions' leases and touches their waiting items (``batch_leases``), so
   none of them looks stuck and none is rescued.

On its way out a driver calls ``/cancel`` for what a suspend marked and hands its
submissions over (their leases end). ``drain`` is the pass for a run being deleted: it
cancels and ingests without claiming, until no submission is open (the operator's
finalizer calls it; ``queue.runs.delete_run`` refuses while one is).

A batch object that lacks a field the driver needs (``MalformedBatch``) is logged as an
error naming the batch, the provider and the field, and polled again up to
``MALFORMED_POLLS`` times (at once when it is an ended batch without its results): then the
submission is given up deliberately. The provider batch is cancelled if it may still run,
and its items take the error through the retry policy, as for any batch refused as a whole:
a provider that keeps answering malformed objects ends them after ``maxAttempts`` instead of
cycling them unspent forever.

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
from collections.abc import Mapping
from datetime import UTC, datetime

import asyncpg

from analysisq.db.connect import acquire
from analysisq.errors import (
    DatabaseError,
    ProviderError,
    RateLimited,
    TransientError,
)
from analysisq.providers.batch import BatchClient, BatchState, MalformedBatch
from analysisq.queue import batches, budget
from analysisq.queue.batches import Submission
from analysisq.queue.retry import RetryPolicy
from analysisq.queue.runs import Run
from analysisq.spec import Target
from analysisq.worker.batch_leases import TOUCH_SECONDS, SubmissionLeases
from analysisq.worker.batch_plan import batch_targets, past_margin, sync_targets_skipped
from analysisq.worker.batch_results import IngestReport, fail_all, ingest
from analysisq.worker.batch_send import BatchSender, StepHook

log = logging.getLogger("analysisq.worker.batch")

#: Polls in a row that find a submission's batch object malformed before it is given up.
MALFORMED_POLLS = 5


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
        self.leases = SubmissionLeases(
            pool,
            run.id,
            worker=name,
            lease_seconds=float(self.spec.lease_seconds),
            touch_seconds=touch_seconds,
        )
        self._cancelled: set[int] = set()
        #: Malformed polls in a row, per submission; and those whose missing counts were told.
        self._malformed: dict[int, int] = {}
        self._told_missing: set[int] = set()
        self.sender = BatchSender(
            pool, run, self.clients, self.leases, policy=policy, rng=self._rng, step=step
        )
        self.reports: list[IngestReport] = []

    @property
    def lease(self) -> float:
        return float(self.spec.lease_seconds)

    async def run_until(self, stopping: asyncio.Event) -> None:
        """Work until *stopping* is set; submissions left open are adopted by others."""
        beat = asyncio.create_task(self.leases.heartbeat_loop())
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
            await self.leases.hand_over()
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
                self.leases.hold(sub.id)
                if sub.cancel_reason and sub.provider_batch_id and sub.id not in self._cancelled:
                    await self.clients[sub.target].cancel(sub.provider_batch_id)
                    self._cancelled.add(sub.id)
                    log.info(
                        "batch cancelled", extra=self.leases.extra(sub.id, reason=sub.cancel_reason)
                    )
        except (DatabaseError, ProviderError) as exc:
            log.warning(
                "could not cancel marked batches", extra={"run": self.run.id, "error": exc.message}
            )

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
            self.leases.hold(sub.id)
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
            self.leases.hold(sub.id)
            await self._advance(sub)
            busy = True
        if not sync_targets_skipped(self.spec) or await self._budget_exhausted():
            return busy
        for target in batch_targets(self.spec):
            if not self.sender.held(target.name):
                busy |= await self.sender.claim_and_send(target)
        return busy

    async def _budget_exhausted(self) -> bool:
        """The run is paused for its budget: no new batch until the budget is raised."""
        if self.spec.budget is None:
            return False
        async with acquire(self.pool) as conn:
            state = await budget.state(conn, self.run.id)
        return state is not None and state.exhausted

    # -- advancing a taken submission ---------------------------------------------------------

    async def _advance(self, sub: Submission) -> None:
        target = self.spec.target(sub.target)
        client = self.clients[sub.target]
        if sub.state == "intent":
            await self._reconcile(sub, target, client)
            return
        assert sub.provider_batch_id is not None
        await self.leases.touch_if_due(sub.id)
        try:
            if sub.cancel_reason and sub.id not in self._cancelled:
                await client.cancel(sub.provider_batch_id)
                self._cancelled.add(sub.id)
            state = await client.poll(sub.provider_batch_id)
        except MalformedBatch as exc:
            await self._malformed_poll(sub, client, exc)
            return
        except ProviderError as exc:
            # 404 just after create, 5xx, timeouts: ask again at the next poll.
            log.warning(
                "batch poll failed; will retry", extra=self.leases.extra(sub.id, error=exc.message)
            )
            await self._polled(sub, "poll failed")
            return
        self._malformed.pop(sub.id, None)
        self._tell_missing(sub, state)
        if state.phase == "open":
            await self._polled(sub, state.status, state.counts)
            return
        if state.phase == "failed":
            failure = state.failure or TransientError("the batch failed without a reason")
            if isinstance(failure, RateLimited):
                await self.sender.back_pressure(sub.id, sub.target, failure)
                return
            report = await fail_all(
                self.pool,
                self.run.id,
                sub.id,
                TransientError(failure.message),
                policy=self.policy,
                rng=self._rng,
            )
            await self.leases.finish(
                sub.id, sub.target, f"failed: {failure.message}; {report.line()}"
            )
            return
        if self._step is not None:
            await self._step("ingesting")
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
        await self.leases.finish(sub.id, sub.target, f"{state.status}: {report.line()}")

    async def _polled(
        self, sub: Submission, status: str, counts: Mapping[str, int] | None = None
    ) -> None:
        async with acquire(self.pool) as conn:
            await batches.polled(
                conn,
                sub.id,
                worker=self.name,
                status=status,
                counts=counts or {},
                poll_in=self.spec.target(sub.target).batch.poll_seconds,
            )

    async def _malformed_poll(
        self, sub: Submission, client: BatchClient, exc: MalformedBatch
    ) -> None:
        """Poll a malformed batch object again, up to ``MALFORMED_POLLS`` times in a row
        (not at all once it ended without its results); then give the submission up."""
        polls = self._malformed.get(sub.id, 0) + 1
        self._malformed[sub.id] = polls
        give_up = exc.final or polls >= MALFORMED_POLLS
        log.error(
            "provider batch object is malformed; "
            + ("giving the submission up" if give_up else "will poll again"),
            extra=self.leases.extra(
                sub.id,
                provider=exc.provider,
                batch=exc.batch_id,
                field=exc.field,
                polls=polls,
                error=exc.message,
            ),
        )
        if not give_up:
            await self._polled(sub, f"malformed: no valid {exc.field}")
            return
        self._malformed.pop(sub.id, None)
        if not exc.final:  # it may still run (and be paid for): stop it
            try:
                await client.cancel(exc.batch_id)
            except ProviderError as cancel:
                log.warning(
                    "could not cancel a malformed batch",
                    extra=self.leases.extra(sub.id, batch=exc.batch_id, error=cancel.message),
                )
        error = TransientError(f"batch given up: {exc.message}")
        report = await fail_all(
            self.pool, self.run.id, sub.id, error, policy=self.policy, rng=self._rng
        )
        await self.leases.finish(sub.id, sub.target, f"given up: {exc.message}; {report.line()}")

    def _tell_missing(self, sub: Submission, state: BatchState) -> None:
        """Fields a batch object lacks that polling can do without: an error, once."""
        if not state.missing or sub.id in self._told_missing:
            return
        self._told_missing.add(sub.id)
        log.error(
            "provider batch object lacks fields; polling on without them",
            extra=self.leases.extra(
                sub.id,
                provider=self.clients[sub.target].target.provider,
                batch=state.provider_id,
                field=", ".join(state.missing),
            ),
        )

    async def _reconcile(self, sub: Submission, target: Target, client: BatchClient) -> None:
        """An intent whose sender died (or timed out): adopt the batch it may have created,
        else send it now."""
        async with acquire(self.pool) as conn:
            known = await batches.known_ids(conn, self.run.id, sub.target)
        try:
            found = await client.find(
                self.sender.metadata(sub.id),
                since=sub.created_at,
                count=sub.item_count,
                known=known,
            )
        except ProviderError as exc:
            log.warning(
                "batch reconciliation failed; will retry",
                extra=self.leases.extra(sub.id, error=exc.message),
            )
            return
        if found is not None:
            async with acquire(self.pool) as conn:
                await batches.submitted(
                    conn, sub.id, worker=self.name, provider_batch_id=found, poll_in=0.0
                )
            log.info(
                "adopted a batch sent before a crash", extra=self.leases.extra(sub.id, batch=found)
            )
            return
        if sub.cancel_reason:
            await self.leases.finish(sub.id, sub.target, f"not sent: {sub.cancel_reason}")
            return
        async with acquire(self.pool) as conn:
            waiting = await batches.waiting_items(conn, sub.id)
        await self.sender.send(sub.id, target, waiting)

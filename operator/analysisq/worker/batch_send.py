"""Sending a provider batch: claim a submission, fit it, reserve its budget, POST it.

``BatchSender.claim_and_send`` claims a new submission of a target (intent and items in one
commit, ``queue.batches.claim``: ids and claims, not prompts) and ``send`` fits it to
``batch.maxBytes`` (the rest spill back unspent, a request that can never fit is refused on
its own), reserves its budget and POSTs it; the driver also calls ``send`` for an intent
whose sender died before its POST. The prompts are read a page at a time
(``batches.prompt_page``: one statement each, no cursor, so it works behind PgBouncer in
transaction mode), the next page read while one is encoded, and each request is written to
the batch's spooled input as it is built, so the sender's memory does not grow with the
batch: a 200 MB input holds two pages of prompts and the claims (about 8 bytes an entry more
for the spool's offsets). What did not fit goes back in one statement (``batches.spill``). Right
before the POST the submission records how many requests it sends (``batches.sending``,
fenced: one no longer ours is not sent), which is how a reconciliation after a crash finds
an Anthropic batch that was split or cut for the budget.
A refusal for the provider's own limits (``RateLimited``) is back-pressure: the items go back
unspent and the target sends no batch until ``hold_until``; refused credentials pause the
target; a timeout leaves the intent to be reconciled (the batch may exist); any other refusal
sends every item through the retry policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping

import asyncpg

from analysisq.db.connect import acquire
from analysisq.errors import AuthError, ProviderError, RateLimited, TransientError
from analysisq.providers.batch import BatchClient
from analysisq.queue import batches, items, runs
from analysisq.queue.items import ClaimedItem
from analysisq.queue.retry import RetryPolicy
from analysisq.queue.runs import Run
from analysisq.spec import Target
from analysisq.worker import batch_budget
from analysisq.worker.batch_leases import ITEM_LEASE_SECONDS, SubmissionLeases
from analysisq.worker.batch_plan import Plan
from analysisq.worker.batch_results import fail_all

log = logging.getLogger("analysisq.worker.batch")

#: Prompts read per page while a batch's input is written: at most this many items, and
#: prompts of about this many bytes (at least one prompt), so the sender holds two pages of
#: prompts (one encoded, the next read) whatever the batch's size (a claim of 50,000 holds
#: none: ``batches.claim``).
PAGE_ITEMS = 1000
PAGE_BYTES = 2 * 2**20
#: Requests added between two turns of the event loop while a page is added: the next
#: page's rows are received (and the leases renewed) while this one is encoded.
YIELD_ITEMS = 50

#: Back-pressure after a refusal that named no delay.
BACK_PRESSURE_SECONDS = 60.0

#: A test's hook into the driver's steps ("before_post", "after_post", "ingesting").
StepHook = Callable[[str], Awaitable[None]]


class BatchSender:
    """Sends one run's batches for one driver (see the module docstring)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        run: Run,
        clients: Mapping[str, BatchClient],
        leases: SubmissionLeases,
        *,
        policy: RetryPolicy,
        rng: random.Random,
        step: StepHook | None,
    ) -> None:
        self.pool = pool
        self.run = run
        self.clients = clients
        self.leases = leases
        self.policy = policy
        self._rng = rng
        self._step = step
        #: Monotonic time before which a target sends no new batch (back-pressure).
        self.hold_until: dict[str, float] = {}

    def held(self, target: str) -> bool:
        return time.monotonic() < self.hold_until.get(target, 0.0)

    def metadata(self, sub_id: int) -> dict[str, str]:
        return {"analysisq_run": self.run.id[:512], "analysisq_submission": str(sub_id)}

    async def claim_and_send(self, target: Target) -> bool:
        """Claim a new submission of *target* and send it; False if nothing was claimable."""
        async with acquire(self.pool) as conn:
            sub_id, claimed = await batches.claim(
                conn,
                self.run.id,
                target.name,
                worker=self.leases.worker,
                limit=target.batch.max_requests,
                lease_seconds=self.leases.lease_seconds,
                item_lease_seconds=ITEM_LEASE_SECONDS,
            )
        if sub_id is None:
            return False
        self.leases.hold(sub_id, touched=True)
        await self.send(sub_id, target, claimed)
        return True

    async def send(self, sub_id: int, target: Target, claimed: list[ClaimedItem]) -> None:
        """Fit *claimed* to one batch of *target*, reserve its budget, and send it."""
        client = self.clients[target.name]
        with client.spool() as body:
            plan = Plan(client, target, body, estimating=self.run.spec.budget is not None)
            await self._fit(sub_id, plan, claimed)
            await self._post(sub_id, target, client, plan)

    async def _fit(self, sub_id: int, plan: Plan, claimed: list[ClaimedItem]) -> None:
        """Add *claimed* to *plan* in id order, their prompts read a page at a time, the next
        page read while one is added: the sender holds two pages of prompts at most, never
        the batch's (see ``PAGE_BYTES``), and the database's work and the encoding overlap."""
        ordered = sorted(claimed, key=lambda item: item.id)
        reading = asyncio.create_task(self._page(sub_id, ordered, 0)) if ordered else None
        try:
            while reading is not None:
                page, end = await reading
                reading = None
                if end < len(ordered):
                    reading = asyncio.create_task(self._page(sub_id, ordered, end))
                for n, (item, text) in enumerate(page, 1):
                    plan.add(item, text)
                    if n % YIELD_ITEMS == 0:
                        await asyncio.sleep(0)  # the next page's rows come in meanwhile
                del page
        finally:
            if reading is not None:
                reading.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reading

    async def _page(
        self, sub_id: int, ordered: list[ClaimedItem], start: int
    ) -> tuple[list[tuple[ClaimedItem, str]], int]:
        """The page of *ordered* from *start*: its items still waiting in the submission with
        their prompts, and where the next page starts (past ``PAGE_BYTES`` of prompts, or
        ``PAGE_ITEMS`` items; never at *start*: the first item of a page has its prompt)."""
        chunk = ordered[start : start + PAGE_ITEMS]
        ids = [i.id for i in chunk]
        async with acquire(self.pool) as conn:
            texts = dict(await batches.prompt_page(conn, sub_id, ids, max_bytes=PAGE_BYTES))
        page: list[tuple[ClaimedItem, str]] = []
        end = start
        for item in chunk:
            if item.id in texts and texts[item.id] is None:
                break  # past the page's bytes: the next page starts here
            end += 1
            text = texts.pop(item.id, None)
            if text is not None:  # else no longer waiting in the submission: not ours
                page.append((item, text))
        return page, end

    async def _post(self, sub_id: int, target: Target, client: BatchClient, plan: Plan) -> None:
        async with acquire(self.pool) as conn:
            for item, refusal in plan.refused:
                await items.fail(conn, item, refusal.error_class, refusal.message, None)
            await batches.spill(conn, sub_id, plan.spill)
        if not plan.sent:
            await self.leases.finish(sub_id, target.name, "nothing to send")
            return
        if self.run.spec.budget is not None:
            fits = await batch_budget.reserve(
                self.pool,
                self.run.id,
                sub_id,
                worker=self.leases.worker,
                target=target,
                sent=plan.sent,
                estimates=plan.estimates,
            )
            if not fits:
                await self.leases.finish(
                    sub_id, target.name, "not sent: the run's budget is exhausted"
                )
                return
            plan.cut(fits)
        async with acquire(self.pool) as conn:
            ours = await batches.sending(
                conn, sub_id, worker=self.leases.worker, item_count=len(plan.sent)
            )
        if not ours:
            log.warning(
                "batch submission is no longer ours; not sent", extra=self.leases.extra(sub_id)
            )
            return
        await self._hook("before_post")
        try:
            provider_id = await client.submit(plan.body, self.metadata(sub_id))
        except RateLimited as exc:
            await self.back_pressure(sub_id, target.name, exc)
            return
        except AuthError as exc:
            await self.leases.finish(sub_id, target.name, f"refused: {exc.message}")
            async with acquire(self.pool) as conn:
                await runs.pause_target(conn, self.run.id, target.name, exc.message)
            return
        except TransientError as exc:
            # It may have been created anyway (a timeout): leave the intent to reconcile.
            log.warning(
                "batch submit failed; will reconcile",
                extra=self.leases.extra(sub_id, error=exc.message),
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
            await self.leases.finish(
                sub_id, target.name, f"refused: {exc.message}; {report.line()}"
            )
            return
        await self._hook("after_post")
        async with acquire(self.pool) as conn:
            ok = await batches.submitted(
                conn,
                sub_id,
                worker=self.leases.worker,
                provider_batch_id=provider_id,
                poll_in=target.batch.poll_seconds,
            )
        if not ok:
            log.error(
                "batch sent but its submission is no longer ours; its new owner will "
                "find it by reconciliation",
                extra=self.leases.extra(sub_id, batch=provider_id),
            )
        log.info(
            "batch submitted",
            extra=self.leases.extra(sub_id, batch=provider_id, items=len(plan.sent)),
        )

    async def back_pressure(self, sub_id: int, target: str, exc: RateLimited) -> None:
        """The provider refused for its own limits: no batch of *target* for the delay."""
        delay = exc.delay or BACK_PRESSURE_SECONDS
        self.hold_until[target] = time.monotonic() + delay
        log.warning(
            "provider refused a batch: back-pressure",
            extra=self.leases.extra(sub_id, error=exc.message, delay=delay),
        )
        await self.leases.finish(sub_id, target, f"back-pressure: {exc.message}", release_in=delay)

    # -- advancing a taken submission ---------------------------------------------------------

    async def _hook(self, step: str) -> None:
        if self._step is not None:
            await self._step(step)

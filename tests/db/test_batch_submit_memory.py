"""The submit side of batch mode in bounded memory: a large submission is claimed without its
prompts, and they are read a page at a time into the batch's spooled input."""

from __future__ import annotations

import asyncio
import tracemalloc

import asyncpg
import httpx
import pytest
from test_batch_driver import Crash, check_invariants, driver, http, target, until_done

from analysisq.fake_provider import FakeConfig, FakeProvider
from analysisq.providers import batch
from analysisq.queue import runs
from analysisq.worker import batch_send
from support import add_prompts, new_run, spec

pytestmark = [pytest.mark.db, pytest.mark.timeout(240)]

__all__ = ["http"]  # the fixture, shared with test_batch_driver


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_a_large_submission_holds_a_page_of_prompts_not_the_batch(
    db: asyncpg.Connection,
    pool: asyncpg.Pool,
    http: httpx.AsyncClient,
    provider: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """3,000 prompts of 16 kB (a 48 MB input) in one submission: Python memory from the
    claim to the POST peaks at a small part of the input (holding the claimed prompts, as
    before, took all of it and more), and every item is answered once."""
    items, prompt_bytes = 3_000, 16_000
    monkeypatch.setattr(batch, "SPOOL_BYTES", 2**20)  # the spool's part kept in memory
    await add_prompts(db, items, text="Prompt {i}: " + "words " * (prompt_bytes // 6))
    peaks: list[int] = []

    async def measure(step: str) -> None:
        if step == "before_post" and tracemalloc.is_tracing():
            peaks.append(tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()  # the upload and the fake's copy of it are not counted

    async with FakeProvider(FakeConfig(batch_seconds=0.2)) as fake:
        s = spec(targets=[target(fake, provider, maxRequests=items, maxBytes=256_000_000)])
        await new_run(db, "run-1", s)
        run = await runs.get_run(db, "run-1")
        tracemalloc.start()
        try:
            await until_done(pool, [driver(pool, run, http, "w1", measure)])
        finally:
            tracemalloc.stop()
        stats = fake.stats()
    counts = await check_invariants(db)
    assert counts.completed == items and stats.batches_created == 1
    assert stats.prompts_completed_more_than_once == 0 and stats.completions == items
    input_bytes = items * prompt_bytes
    # One page of prompts (PAGE_BYTES), the spool's memory part, the claims: a few MB.
    assert input_bytes / 4 > 2 * batch_send.PAGE_BYTES  # the bound is not the page
    (peak,) = peaks
    assert peak < input_bytes / 4, (peak, input_bytes)


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_a_crash_after_posting_a_split_batch_never_pays_twice(
    db: asyncpg.Connection, pool: asyncpg.Pool, http: httpx.AsyncClient, provider: str
) -> None:
    """A submission whose input was split (``maxBytes``: the rest spilled back) sends fewer
    requests than it claimed; the worker dies after the POST, before it recorded the batch.
    Its heir finds that batch (Anthropic: by its number of requests) instead of paying for a
    second one."""
    crashed = asyncio.Event()

    async def die(step: str) -> None:
        if step == "after_post" and not crashed.is_set():
            crashed.set()
            raise Crash(step)

    async with FakeProvider(FakeConfig(batch_seconds=0.2)) as fake:
        await add_prompts(db, 600)
        s = spec(targets=[target(fake, provider, maxBytes=60_000)], leaseSeconds=5)
        await new_run(db, "run-1", s)
        run = await runs.get_run(db, "run-1")
        with pytest.raises(Crash):
            await until_done(pool, [driver(pool, run, http, "doomed", die)], timeout=30)
        await until_done(pool, [driver(pool, run, http, "heir")])
        stats = fake.stats()
    counts = await check_invariants(db)
    assert counts.completed == 600 and stats.prompts_completed_more_than_once == 0
    submissions = await db.fetchval("SELECT count(*) FROM batch_submissions")
    assert submissions > 1  # the input was split
    assert stats.batches_created == submissions

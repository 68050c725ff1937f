"""Deleting a run with open provider batches: its rows stay until every batch is cancelled
at the provider and its partial results are ingested (``BatchDriver.drain``), so a crash in
between loses nothing and no paid batch runs on unknown."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import httpx
import pytest
from test_batch_driver import driver, target, until_sent

from analysisq.errors import BatchesOpen
from analysisq.fake_provider import FakeConfig, FakeProvider
from analysisq.providers import make_http_client
from analysisq.queue import runs
from analysisq.worker.batch import BatchDriver
from support import add_prompts, new_run, spec

pytestmark = [pytest.mark.db, pytest.mark.timeout(120)]


class Crash(Exception):
    """The operator dies here."""


@pytest.fixture
async def http() -> Any:
    client = make_http_client(trust_env=False)
    yield client
    await client.aclose()


async def provider_status(db: asyncpg.Connection, fake: FakeProvider) -> str:
    """What the fake provider says of the run's (one) OpenAI batch."""
    batch_id = await db.fetchval("SELECT provider_batch_id FROM batch_submissions")
    async with httpx.AsyncClient(trust_env=False) as plain:
        return str((await plain.get(f"{fake.url}/batches/{batch_id}")).json()["status"])


async def drain_until_closed(d: BatchDriver, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while await d.drain("delete"):
        assert time.monotonic() < deadline, "the run's batches were not closed in time"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_deleting_a_run_cancels_its_batches_and_ingests_partial_results(
    db: asyncpg.Connection, pool: asyncpg.Pool, http: httpx.AsyncClient, provider: str
) -> None:
    async with FakeProvider(FakeConfig(batch_seconds=6)) as fake:
        await add_prompts(db, 100)
        # A long lease: the operator can take the submission at once only if the stopping
        # worker handed it over.
        await new_run(db, "run-1", spec(targets=[target(fake, provider)], leaseSeconds=300))
        run = await runs.get_run(db, "run-1")
        stop = asyncio.Event()
        worker = asyncio.create_task(driver(pool, run, http, "w1").run_until(stop))
        await until_sent(db)
        await asyncio.sleep(2.5)  # part of the batch is answered
        with pytest.raises(BatchesOpen, match="1 open provider batches"):
            await runs.delete_run(db, "run-1")
        assert await db.fetchval("SELECT count(*) FROM analysis_queue") == 100
        # The operator's finalizer: the workers are scaled down, then it drains the batches.
        stop.set()
        await worker
        crashed = asyncio.Event()

        async def die(step: str) -> None:
            if step == "ingesting" and not crashed.is_set():
                crashed.set()
                raise Crash(step)

        # An operator that dies as it starts ingesting, then its restart finishes.
        with pytest.raises(Crash):
            await drain_until_closed(driver(pool, run, http, "operator", die))
        with pytest.raises(BatchesOpen):
            await runs.delete_run(db, "run-1")
        await drain_until_closed(driver(pool, run, http, "operator"))
        stats = fake.stats()
    (outcome,) = [r[0] for r in await db.fetch("SELECT outcome FROM batch_submissions")]
    assert outcome.startswith(("cancelled:", "ended:")) and " unspent" in outcome
    counts = await runs.counts(db, "run-1")
    assert 0 < counts.completed < 100 and counts.pending == 100 - counts.completed
    assert counts.processing == 0
    unspent = "SELECT max(attempts) FROM analysis_queue WHERE status = 'pending'"
    assert await db.fetchval(unspent) == 0
    assert await db.fetchval("SELECT count(*) FROM analysis_results") == counts.completed
    assert stats.batches_created == 1 and stats.prompts_completed_more_than_once == 0
    await runs.delete_run(db, "run-1")
    assert await db.fetchval("SELECT count(*) FROM analysis_queue") == 0
    assert await db.fetchval("SELECT count(*) FROM analysis_results") == 0


async def test_a_batch_sent_just_before_a_crash_is_found_and_cancelled(
    db: asyncpg.Connection, pool: asyncpg.Pool, http: httpx.AsyncClient
) -> None:
    """A worker died between its POST and its commit, then the run was deleted: the intent
    is reconciled with the provider and the batch it finds is cancelled, not left running."""

    async def die(step: str) -> None:
        if step == "after_post":
            raise Crash(step)

    async with FakeProvider(FakeConfig(batch_seconds=30)) as fake:
        await add_prompts(db, 20)
        await new_run(db, "run-1", spec(targets=[target(fake, "openai")], leaseSeconds=5))
        run = await runs.get_run(db, "run-1")
        with pytest.raises(Crash):
            await driver(pool, run, http, "w1", die).round()
        assert await db.fetchval("SELECT state FROM batch_submissions") == "intent"
        await db.execute("UPDATE batch_submissions SET lease_expires_at = now()")
        await drain_until_closed(driver(pool, run, http, "operator"))
        seen = await provider_status(db, fake)
        stats = fake.stats()
    assert seen == "cancelled" and stats.batches_created == 1
    counts = await runs.counts(db, "run-1")
    assert counts.pending == 20 and counts.processing == 0
    await runs.delete_run(db, "run-1")


async def test_a_near_deadline_cancels_the_open_batch_and_the_sync_path_finishes(
    db: asyncpg.Connection, pool: asyncpg.Pool, http: httpx.AsyncClient
) -> None:
    """A batch still open when the run's deadline comes within 30 minutes is cancelled, its
    partial results ingested, and the rest answered on the sync path, each item once."""
    from datetime import UTC, datetime, timedelta

    from analysisq.settings import Settings
    from analysisq.worker.loops import Worker

    async with FakeProvider(FakeConfig(batch_seconds=20)) as fake:
        await add_prompts(db, 200)
        later = (datetime.now(UTC) + timedelta(hours=2)).isoformat()
        s = spec(targets=[target(fake, "openai")], deadline=later)
        await new_run(db, "run-1", s)
        run = await runs.get_run(db, "run-1")
        stop = asyncio.Event()
        early = asyncio.create_task(driver(pool, run, http, "w1").run_until(stop))
        await until_sent(db)
        await asyncio.sleep(4)  # part of the batch is answered
        stop.set()
        await early
        # The run goes on until its deadline is 20 minutes away: inside the margin.
        soon = (datetime.now(UTC) + timedelta(minutes=20)).isoformat()
        await runs.create_run(db, "run-1", spec(targets=[target(fake, "openai")], deadline=soon))
        run = await runs.get_run(db, "run-1")
        settings = Settings(database_url="unused", poll_seconds=0.05, retry_base_seconds=0.05)
        async with asyncio.timeout(90):
            await Worker(pool, run, settings, name="w2", exit_when_done=True).run_until_stopped()
        seen = await provider_status(db, fake)
        stats = fake.stats()
    assert seen == "cancelled" and stats.batches_created == 1
    counts = await runs.counts(db, "run-1")
    assert counts.completed == 200 and counts.done
    by_path = dict(await db.fetch("SELECT via_batch, count(*) FROM analysis_results GROUP BY 1"))
    assert by_path.get(True, 0) > 0 and by_path.get(False, 0) > 0, by_path
    assert stats.requests == by_path[False]  # the rest went one request each
    assert stats.prompts_completed_more_than_once == 0
    (outcome,) = [r[0] for r in await db.fetch("SELECT outcome FROM batch_submissions")]
    assert outcome.startswith("cancelled:"), outcome

"""SIGKILL of the worker that owns a provider batch submission, at the three moments that
matter: before its POST took effect, after the POST but before its commit, and while it
ingests the results. Real ``analysisq worker`` processes; the fake provider (in this
process) holds the create request open so that the kill lands exactly there, and counts the
batches created: exactly one per submission, every item terminal, no result twice."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from workers import WorkerProcs

from analysisq.fake_provider import FakeConfig, FakeProvider
from analysisq.queue import runs
from support import add_prompts, new_run, spec

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(300)]

ITEMS = 4000
HOLD = FakeConfig(batch_seconds=1.0)


def batch_spec(fake: FakeProvider, provider: str) -> Any:
    endpoint = fake.url if provider == "openai" else fake.root_url
    target = {"name": "b", "provider": provider, "model": "m", "endpoint": endpoint,
              "mode": "batch", "batch": {"pollSeconds": 0.2}}  # fmt: skip
    return spec(targets=[target], leaseSeconds=5)


async def until(check: Any, timeout: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s: {what}")


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
@pytest.mark.parametrize("moment", ["before_post", "after_post", "ingesting"])
async def test_sigkill_of_the_submission_owner_never_pays_twice(
    db: asyncpg.Connection,
    db_url: str,
    tmp_path: Path,
    procs_factory: list[WorkerProcs],
    provider: str,
    moment: str,
) -> None:
    held = {
        "before_post": FakeConfig(batch_seconds=1.0, batch_delay_before_create_s=120),
        "after_post": FakeConfig(batch_seconds=1.0, batch_delay_after_create_s=120),
        "ingesting": HOLD,
    }[moment]
    async with FakeProvider(held) as fake:
        await add_prompts(db, ITEMS)
        await new_run(db, s=batch_spec(fake, provider))
        procs = WorkerProcs(db_url, "run-1", tmp_path)
        procs_factory.append(procs)
        (victim,) = procs.start(1)

        async def submission_open() -> bool:
            return bool(await db.fetchval("SELECT count(*) FROM batch_submissions"))

        async def batch_created() -> bool:
            return fake.stats().batches_created == 1

        async def ingesting() -> bool:
            n = await db.fetchval("SELECT count(*) FROM analysis_results")
            return bool(0 < n < ITEMS)

        if moment == "before_post":
            await until(submission_open, 120, "no submission")
            await asyncio.sleep(2.0)  # building and sending; the fake holds the create
        elif moment == "after_post":
            await until(batch_created, 120, "no batch created")
        else:
            await until(ingesting, 120, "never caught ingesting")
        victim.send_signal(signal.SIGKILL)
        await asyncio.to_thread(victim.wait, 30)
        state = await db.fetchrow("SELECT state, provider_batch_id FROM batch_submissions")
        created_before = fake.stats().batches_created
        fake.configure(HOLD)
        procs.start(1)  # the heir adopts the submission once its lease expires
        codes = await asyncio.to_thread(procs.wait, 240)
        stats = fake.stats()
    assert codes == [-signal.SIGKILL, 0], procs.logs()
    if moment == "before_post":
        assert created_before == 0 and state["state"] == "intent"
    elif moment == "after_post":
        assert created_before == 1 and state["state"] == "intent"  # sent, never committed
    else:
        assert state["state"] == "submitted"
    counts = await runs.counts(db, "run-1")
    assert counts.done and counts.completed == ITEMS, counts
    assert await db.fetchval("SELECT count(DISTINCT queue_id) FROM analysis_results") == ITEMS
    assert await db.fetchval("SELECT count(*) FROM analysis_results") == ITEMS
    assert await db.fetchval("SELECT count(*) FROM batch_submissions") == 1
    # exactly one provider batch for the one submission; each prompt answered once
    assert stats.batches_created == 1, procs.logs()
    assert stats.completions == ITEMS and stats.prompts_completed_more_than_once == 0

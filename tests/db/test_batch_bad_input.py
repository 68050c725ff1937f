"""Bad provider output in batch mode: each case a clear logged error, nothing lost, nothing
answered twice (issue 11's "Bad input" list), against a real PostgreSQL and the fake
provider's Batch APIs."""

from __future__ import annotations

import asyncio
import tracemalloc
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import httpx
import pytest
from test_batch_driver import check_invariants, driver, http, target, until_done

from analysisq.fake_provider import FakeConfig, FakeProvider
from analysisq.queue import runs
from analysisq.queue.retry import RetryPolicy
from analysisq.worker.batch import MALFORMED_POLLS
from support import add_prompts, new_run, spec

pytestmark = [pytest.mark.db, pytest.mark.timeout(240)]

__all__ = ["http"]  # the fixture, shared with test_batch_driver

FIRST = "SELECT outcome, provider_batch_id, state FROM batch_submissions ORDER BY id LIMIT 1"


async def run_to_the_end(
    db: asyncpg.Connection,
    pool: asyncpg.Pool,
    http: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
    config: FakeConfig,
    provider: str,
    count: int,
    step: Callable[[str], Awaitable[None]] | None = None,
) -> None:
    """*count* prompts through one batch target of *provider*, errors captured."""
    async with FakeProvider(config) as fake:
        await add_prompts(db, count)
        await new_run(db, "run-1", spec(targets=[target(fake, provider)]))
        run = await runs.get_run(db, "run-1")
        with caplog.at_level("ERROR", logger="analysisq.worker.batch"):
            await until_done(pool, [driver(pool, run, http, "w1", step)])
        assert fake.stats().batches_created == (1 if step is None else 2)


def errors(caplog: pytest.LogCaptureFixture, start: str) -> list[Any]:
    return [
        r for r in caplog.records if r.levelname == "ERROR" and r.getMessage().startswith(start)
    ]


@pytest.mark.parametrize(
    ("provider", "field", "final"),
    [
        ("openai", "status", False),
        ("openai", "output_file_id", True),
        ("anthropic", "processing_status", False),
        ("anthropic", "results_url", True),
    ],
)
async def test_a_batch_object_missing_a_field_is_given_up_and_nothing_is_lost(
    db: asyncpg.Connection,
    pool: asyncpg.Pool,
    http: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
    provider: str,
    field: str,
    final: bool,
) -> None:
    # An open batch (final=False) stays open for the whole test unless it is cancelled.
    config = FakeConfig(batch_seconds=0.2 if final else 60, batch_drop_fields=[field])
    async with FakeProvider(config) as fake:
        await add_prompts(db, 40)
        await new_run(db, "run-1", spec(targets=[target(fake, provider)], maxAttempts=3))
        run = await runs.get_run(db, "run-1")
        # A long backoff: most retries wait, so what the give-up left can be read.
        d = driver(pool, run, http, "w1")
        d.policy = d.sender.policy = RetryPolicy(base_seconds=2, cap_seconds=2)
        with caplog.at_level("ERROR", logger="analysisq.worker.batch"):
            async with asyncio.timeout(60):
                while (await db.fetchrow(FIRST) or {"state": None})["state"] != "done":
                    await d.round()
                    await asyncio.sleep(0.06)
        outcome, batch_id, _ = await db.fetchrow(FIRST)
        logged = errors(caplog, "provider batch object is malformed")
        # The items took the error through the retry policy: one attempt spent, a retry
        # scheduled, the message names the field; none was written, none is still held.
        held = await db.fetch(
            "SELECT status, attempts, error_message, next_attempt_at IS NOT NULL AS retry"
            " FROM analysis_queue WHERE run_id = 'run-1'"
        )
        # What the provider says of the batch once its objects are whole again.
        fake.configure(FakeConfig(batch_seconds=0.2))
        async with httpx.AsyncClient(trust_env=False) as plain:
            path = "batches" if provider == "openai" else "messages/batches"
            seen = (await plain.get(f"{fake.url}/{path}/{batch_id}")).json()
        await until_done(pool, [d])  # w1 may hold a new submission of the retries already
    assert outcome.startswith("given up:") and field in outcome
    assert len(logged) == (1 if final else MALFORMED_POLLS)
    last = logged[-1]
    assert (last.provider, last.batch, last.field) == (provider, batch_id, field)
    assert last.getMessage().endswith("giving the submission up")
    assert field in last.error and batch_id in last.error
    assert len(held) == 40
    # (A retry whose jittered backoff was short may be in the next batch already: then its
    # second attempt. An item put back unspent would be at attempt 0, or 1 in that batch.)
    states = {(r["status"], r["attempts"], r["retry"]) for r in held}
    assert states <= {("failed", 1, True), ("processing", 2, False)}, states
    assert all(field in r["error_message"] for r in held)
    status = seen.get("status") or seen.get("processing_status")
    if final:
        assert status in ("completed", "ended")
    else:  # it was still running: it was cancelled, not left to run (and be paid) unread
        assert status in ("cancelling", "cancelled", "canceling", "ended")
        assert seen.get("cancelling_at") or seen.get("cancel_initiated_at")
    # Nothing lost, nothing answered twice: the next batch answered each item once.
    counts = await check_invariants(db)
    assert counts.completed == 40
    assert await db.fetchval("SELECT max(attempts) FROM analysis_queue") == 2


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_a_batch_object_without_request_counts_is_polled_on_with_an_error(
    db: asyncpg.Connection,
    pool: asyncpg.Pool,
    http: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
    provider: str,
) -> None:
    """The counts are shown, never needed to ingest: the batch is ingested whole, and the
    missing field is logged once per submission, naming the provider and the batch."""
    config = FakeConfig(batch_seconds=0.5, batch_drop_fields=["request_counts"])
    await run_to_the_end(db, pool, http, caplog, config, provider, 30)
    counts = await check_invariants(db)
    assert counts.completed == 30
    (logged,) = errors(caplog, "provider batch object lacks fields")
    batch_id = await db.fetchval("SELECT provider_batch_id FROM batch_submissions")
    assert (logged.provider, logged.batch, logged.field) == (provider, batch_id, "request_counts")


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_results_for_claims_lost_while_ingesting_are_logged_and_written_once(
    db: asyncpg.Connection,
    pool: asyncpg.Pool,
    http: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
    provider: str,
) -> None:
    """After the first chunk of answers is on its way, every claim the submission still
    holds is taken over (as a reset or another worker would): the rest of the file is for
    items no longer held. The fence refuses each write, the error says how many, and the
    items come back and are answered once in a later batch."""
    calls = 0

    async def take_over(step: str) -> None:
        nonlocal calls
        calls += step == "ingesting"
        if step == "ingesting" and calls == 2:  # 1: before the ingest; 2: after a chunk
            await db.execute(
                "UPDATE analysis_queue SET claim_token = gen_random_uuid()"
                " WHERE submission_id IS NOT NULL AND status = 'processing'"
            )

    config = FakeConfig(batch_seconds=0.2)
    await run_to_the_end(db, pool, http, caplog, config, provider, 1500, take_over)
    counts = await check_invariants(db)
    assert counts.completed == 1500
    (logged,) = errors(caplog, "batch results for items whose claim ended")
    first = await db.fetchval("SELECT outcome FROM batch_submissions ORDER BY id LIMIT 1")
    assert logged.count >= 500 and f"{logged.count} results for claims lost" in first


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_a_200_mb_result_file_is_streamed_every_answer_written_once(
    db: asyncpg.Connection, pool: asyncpg.Pool, http: httpx.AsyncClient, provider: str
) -> None:
    """2,000 results of 105 kB each (padding the client ignores): a 210 MB file. Python
    memory while it is ingested stays far below it (a file held whole would be all of it),
    every item is answered once and nothing else is written."""
    items, pad = 2_000, 105_000
    config = FakeConfig(batch_seconds=0.2, batch_result_padding_bytes=pad)
    peaks: list[int] = []

    async def measure(step: str) -> None:
        if step == "ingesting" and not tracemalloc.is_tracing():
            tracemalloc.start()  # the file the fake built is not counted; the ingest is

    async with FakeProvider(config) as fake:
        await add_prompts(db, items)
        s = spec(targets=[target(fake, provider, maxRequests=items, maxBytes=256_000_000)])
        await new_run(db, "run-1", s)
        run = await runs.get_run(db, "run-1")
        try:
            await until_done(pool, [driver(pool, run, http, "w1", measure)])
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
        stats = fake.stats()
    counts = await check_invariants(db)
    assert counts.completed == items and stats.batches_created == 1
    assert stats.prompts_completed_more_than_once == 0 and stats.completions == items
    outcome = await db.fetchval("SELECT outcome FROM batch_submissions")
    assert outcome.endswith(f"{items} completed, 0 to retry, 0 failed, 0 deferred, 0 unspent")
    assert items * pad > 200 * 10**6
    (peak,) = peaks
    assert peak < 64 * 2**20, peak  # generous: 4-6 MB measured; a whole read: 635 MB

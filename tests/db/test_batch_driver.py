"""The batch driver against a real PostgreSQL and the fake provider's Batch APIs.

Drivers of several "workers" share one run in one event loop; a crash is a step hook that
raises, abandoning the driver mid-step (nothing is cleaned up, as with SIGKILL), and the
fake provider counts the batches created, so "never submitted twice" is checked from the
provider's side.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import httpx
import pytest
from test_runbook_cli import invoke, invoke_json

from analysisq.fake_provider import FakeConfig, FakeProvider
from analysisq.providers import make_batch_client, make_http_client
from analysisq.queue import batches, rescue, runs
from analysisq.queue.retry import RetryPolicy
from analysisq.worker.batch import BatchDriver
from analysisq.worker.batch_plan import sync_targets_skipped
from support import add_prompts, new_run, spec

pytestmark = [pytest.mark.db, pytest.mark.timeout(240)]

POLICY = RetryPolicy(base_seconds=0.05, cap_seconds=0.2)


class Crash(Exception):
    """A worker dies here."""


def target(
    fake: FakeProvider, provider: str, name: str | None = None, **batch: Any
) -> dict[str, Any]:
    return {
        "name": name or provider,
        "provider": provider,
        "model": "m",
        "endpoint": fake.url if provider == "openai" else fake.root_url,
        "mode": "batch",
        "batch": {"pollSeconds": 0.05, **batch},
    }


def driver(
    pool: asyncpg.Pool,
    run: runs.Run,
    http: httpx.AsyncClient,
    name: str,
    step: Callable[[str], Awaitable[None]] | None = None,
    **kw: Any,
) -> BatchDriver:
    clients = {
        t.name: make_batch_client(t, http, None) for t in run.spec.targets if t.mode == "batch"
    }
    return BatchDriver(
        pool, run, clients, name=name, policy=POLICY, rng=random.Random(7), step=step,
        idle_seconds=0.05, **kw,
    )  # fmt: skip


async def until_done(pool: asyncpg.Pool, drivers: list[BatchDriver], timeout: float = 180) -> None:
    stop = asyncio.Event()
    tasks = [asyncio.create_task(d.run_until(stop)) for d in drivers]
    try:
        async with asyncio.timeout(timeout):
            while True:
                async with pool.acquire() as conn:
                    if (await runs.counts(conn, "run-1")).done:
                        break
                for t in tasks:
                    if t.done() and t.exception() is not None:
                        raise t.exception()  # type: ignore[misc]
                await asyncio.sleep(0.1)
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)


async def until_sent(db: asyncpg.Connection, seconds: float = 30) -> None:
    """Until the run's first submission has its provider batch."""
    async with asyncio.timeout(seconds):
        for _ in itertools.count():
            if await db.fetchval("SELECT provider_batch_id FROM batch_submissions"):
                return
            await asyncio.sleep(0.05)


async def check_invariants(db: asyncpg.Connection) -> runs.Counts:
    counts = await runs.counts(db, "run-1")
    assert counts.done and counts.stuck == counts.processing == 0, counts
    results = await db.fetchval("SELECT count(*) FROM analysis_results")
    distinct = await db.fetchval("SELECT count(DISTINCT queue_id) FROM analysis_results")
    assert results == distinct == counts.completed
    assert await db.fetchval("SELECT count(*) FROM analysis_results WHERE NOT via_batch") == 0
    assert (
        await db.fetchval("SELECT count(*) FROM analysis_queue WHERE submission_id IS NOT NULL")
        == 0
    )
    assert await db.fetchval("SELECT count(*) FROM batch_submissions WHERE state <> 'done'") == 0
    return counts


@pytest.fixture
async def http() -> Any:
    client = make_http_client(trust_env=False)
    yield client
    await client.aclose()


async def test_a_run_over_both_providers_survives_every_batch_fault(
    db: asyncpg.Connection, pool: asyncpg.Pool, http: httpx.AsyncClient
) -> None:
    config = FakeConfig(
        batch_seconds=0.3,
        batch_errors={"500": 0.1, "400": 0.01},
        batch_expire_first=1,
        batch_fail_first=1,
        batch_not_found_s=0.1,
    )
    async with FakeProvider(config) as fake:
        await add_prompts(db, 1500)
        s = spec(
            targets=[
                target(fake, "openai", maxRequests=400),
                target(fake, "anthropic", maxRequests=700),
            ],
            maxAttempts=4,
        )
        await new_run(db, "run-1", s)
        run = await runs.get_run(db, "run-1")
        await until_done(pool, [driver(pool, run, http, "w1"), driver(pool, run, http, "w2")])
        stats = fake.stats()
    counts = await check_invariants(db)
    assert counts.total == 3000 and counts.completed + counts.failed_for_good == 3000
    # 1% permanent errors fail at once with the provider's message; transient ones retry.
    assert 10 < counts.failed_for_good < 70
    messages = await db.fetch(
        "SELECT DISTINCT error_class, left(error_message, 40) AS m FROM analysis_queue"
        " WHERE status = 'failed'"
    )
    assert {r["error_class"] for r in messages} <= {"permanent", "transient"}
    # Every answer the provider gave was stored exactly once (each prompt has two targets).
    assert stats.completions == counts.completed
    retried = await db.fetchval("SELECT count(*) FROM analysis_results WHERE attempt > 1")
    assert retried > 100  # the transient errors came back in later batches
    outcomes = [r[0] for r in await db.fetch("SELECT outcome FROM batch_submissions")]
    assert any(o.startswith("expired:") for o in outcomes)
    assert any(o.startswith("back-pressure:") for o in outcomes)
    assert stats.batches_created == len(
        [o for o in outcomes if not o.startswith("back-pressure: HTTP 429")]
    )


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
@pytest.mark.parametrize("where", ["before_post", "after_post", "ingesting"])
async def test_a_crash_never_pays_twice(
    db: asyncpg.Connection, pool: asyncpg.Pool, http: httpx.AsyncClient, provider: str, where: str
) -> None:
    crashed = asyncio.Event()

    async def die(step: str) -> None:
        if step == where and not crashed.is_set():
            crashed.set()
            raise Crash(step)

    async with FakeProvider(FakeConfig(batch_seconds=0.2)) as fake:
        await add_prompts(db, 1200)
        s = spec(targets=[target(fake, provider)], leaseSeconds=5)
        await new_run(db, "run-1", s)
        run = await runs.get_run(db, "run-1")
        doomed = driver(pool, run, http, "doomed", die)
        with pytest.raises(Crash):
            await until_done(pool, [doomed], timeout=30)
        assert crashed.is_set()
        # The dead worker's submission waits out its lease, then "heir" adopts it.
        await until_done(pool, [driver(pool, run, http, "heir")])
        stats = fake.stats()
    counts = await check_invariants(db)
    assert counts.completed == 1200
    assert stats.batches_created == 1 and stats.prompts_completed_more_than_once == 0
    (owner,) = [r[0] for r in await db.fetch("SELECT outcome FROM batch_submissions")]
    assert owner.startswith(("completed:", "ended:"))


async def test_waiting_items_are_neither_stuck_nor_rescued(
    db: asyncpg.Connection, pool: asyncpg.Pool, http: httpx.AsyncClient, db_url: str
) -> None:
    seed_stuck = (
        "SELECT COUNT(*) as stuck_items, MIN(updated_at) as mas_antiguo FROM analysis_queue"
        " WHERE status = 'processing' AND updated_at < NOW() - INTERVAL '10 minutes'"
    )
    async with FakeProvider(FakeConfig(batch_seconds=3600)) as fake:
        await add_prompts(db, 50)
        s = spec(targets=[target(fake, "openai")])
        await new_run(db, "run-1", s)
        run = await runs.get_run(db, "run-1")
        d = driver(pool, run, http, "w1", touch_seconds=0.0)
        assert await d.round()
        # Hours inside the batch: the last touch looks 20 minutes old.
        await db.execute("UPDATE analysis_queue SET updated_at = now() - interval '20 minutes'")
        assert (await db.fetchrow(seed_stuck))["stuck_items"] == 50
        reset = await rescue.rescue_stuck(db, "run-1", 0.001)
        assert reset.reset == reset.poisoned == 0
        await db.execute("UPDATE batch_submissions SET poll_at = now()")
        await d.round()
        assert (await db.fetchrow(seed_stuck))["stuck_items"] == 0
        counts = await runs.counts(db, "run-1")
        assert counts.processing == 50 and counts.stuck == 0
        open_ = await batches.open_batches(db, "run-1")
        summary = await batches.summary(db, "run-1")
    assert [b.item_count for b in open_] == [50] and open_[0].provider_batch_id
    assert open_[0].provider_status == "validating"
    assert summary.in_batches == 50 and summary.open_batches == 1
    # What a person sees: `analysisq status RUN`.
    data = await invoke_json(db_url, "status", "run-1")
    assert data["batches"]["items_in_batches"] == 50
    (listed,) = data["batches"]["open"]
    assert listed["provider_batch_id"] == open_[0].provider_batch_id
    assert listed["status"] == "validating" and listed["items"] == 50
    text = await invoke(db_url, "status", "run-1")
    assert "50 items waiting in 1 open provider batches" in text.stdout


async def test_cancel_ingests_partial_results_and_deadline_moves_to_sync(
    db: asyncpg.Connection, pool: asyncpg.Pool, http: httpx.AsyncClient
) -> None:
    async with FakeProvider(FakeConfig(batch_seconds=4)) as fake:
        await add_prompts(db, 200)
        s = spec(targets=[target(fake, "anthropic")])
        await new_run(db, "run-1", s)
        run = await runs.get_run(db, "run-1")
        d = driver(pool, run, http, "w1")
        assert await d.round()
        await asyncio.sleep(2)
        assert await batches.cancel_open(db, "run-1", "suspend") == 1
        first = "SELECT state, outcome FROM batch_submissions ORDER BY id LIMIT 1"
        for _ in range(100):
            await db.execute("UPDATE batch_submissions SET poll_at = now()")
            await d.round()
            if (await db.fetchrow(first))["state"] == "done":
                break
            await asyncio.sleep(0.1)
        outcome = (await db.fetchrow(first))["outcome"]
        counts = await runs.counts(db, "run-1")
    # The partial results were ingested, the rest went back unspent (and into a new batch).
    assert outcome.startswith("ended:") and " unspent" in outcome
    assert 0 < counts.completed < 200
    assert await db.fetchval("SELECT max(attempts) FROM analysis_queue") == 1
    soon = spec(targets=[{**target(fake, "openai"), "endpoint": "http://x/v1"}],
                deadline="2000-01-01T00:00:00Z")  # fmt: skip
    assert sync_targets_skipped(soon) == [] and sync_targets_skipped(s) == ["anthropic"]


async def test_workers_serve_batch_targets_beside_sync_ones(
    db: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    from analysisq.settings import Settings
    from analysisq.worker.loops import Worker

    settings = Settings(database_url="unused", poll_seconds=0.05, retry_base_seconds=0.05)
    async with FakeProvider(FakeConfig(batch_seconds=0.3)) as fake:
        await add_prompts(db, 300)
        s = spec(targets=[target(fake, "openai"), {"name": "e", "provider": "echo", "model": "m"}])
        await new_run(db, "run-1", s)
        run = await runs.get_run(db, "run-1")
        workers = [Worker(pool, run, settings, name=f"w{i}", exit_when_done=True) for i in range(2)]
        async with asyncio.timeout(120):
            await asyncio.gather(*(w.run_until_stopped() for w in workers))
        stats = fake.stats()
    counts = await runs.counts(db, "run-1")
    assert counts.completed == 600 and counts.done
    by_target = dict(
        await db.fetch("SELECT target, bool_and(via_batch) FROM analysis_results GROUP BY target")
    )
    assert by_target == {"openai": True, "e": False}
    # The sync path never sent a batch target's item: no chat completion reached the fake.
    assert stats.requests == 0 and stats.batch_requests == 300


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_bad_provider_output_is_logged_and_nothing_is_answered_twice(
    db: asyncpg.Connection,
    pool: asyncpg.Pool,
    http: httpx.AsyncClient,
    provider: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = FakeConfig(batch_seconds=0.2, batch_corrupt_results=True)
    async with FakeProvider(config) as fake:
        await add_prompts(db, 200)
        await new_run(db, "run-1", spec(targets=[target(fake, provider)]))
        run = await runs.get_run(db, "run-1")
        with caplog.at_level("ERROR", logger="analysisq.worker.batch"):
            await until_done(pool, [driver(pool, run, http, "w1")])
    counts = await check_invariants(db)
    assert counts.completed == 200
    errors = {r.getMessage(): r for r in caplog.records}
    assert "unreadable batch result" in errors
    unmatched = next(r for m, r in errors.items() if m.startswith("batch results matched no"))
    assert unmatched.count == 2  # type: ignore[attr-defined]  # the unknown id, the repeat
    (outcome,) = [r[0] for r in await db.fetch("SELECT outcome FROM batch_submissions")]
    assert "1 unreadable lines" in outcome and "2 results for items not held" in outcome


async def test_a_stopping_driver_cancels_what_a_suspend_marked(
    db: asyncpg.Connection, pool: asyncpg.Pool, http: httpx.AsyncClient
) -> None:
    async with FakeProvider(FakeConfig(batch_seconds=6)) as fake:
        await add_prompts(db, 100)
        await new_run(db, "run-1", spec(targets=[target(fake, "openai")], leaseSeconds=5))
        run = await runs.get_run(db, "run-1")
        stop = asyncio.Event()
        running = asyncio.create_task(driver(pool, run, http, "w1").run_until(stop))
        await until_sent(db)
        await asyncio.sleep(2.5)  # part of the batch is answered
        # What the operator does on suspend, then the scale-down stops the worker.
        assert await batches.cancel_open(db, "run-1", "suspend") == 1
        stop.set()
        await running
        batch_id = await db.fetchval("SELECT provider_batch_id FROM batch_submissions")
        async with httpx.AsyncClient(trust_env=False) as plain:
            seen = (await plain.get(f"{fake.url}/batches/{batch_id}")).json()["status"]
        # On resume, another worker adopts the submission and ingests the partial results.
        await until_done(pool, [driver(pool, run, http, "w2")])
        stats = fake.stats()
    assert seen in ("cancelling", "cancelled")
    (outcome,) = [
        r[0] for r in await db.fetch("SELECT outcome FROM batch_submissions ORDER BY id LIMIT 1")
    ]
    assert outcome.startswith("cancelled:") and " unspent" in outcome
    counts = await check_invariants(db)
    assert counts.completed == 100 and stats.batches_created == 2


async def test_a_cancel_asked_during_a_poll_is_not_postponed_by_it(db: asyncpg.Connection) -> None:
    """The race behind a suspend that the stopping driver missed: the owner took the
    submission, the operator asked for a cancel, then the owner recorded its poll. The cancel
    must stay due at once (the stopping driver's last pass takes only what is due)."""
    t = {
        "name": "b",
        "provider": "openai",
        "model": "m",
        "mode": "batch",
        "endpoint": "http://127.0.0.1:9/v1",
    }
    await add_prompts(db, 3)
    await new_run(db, "run-1", spec(targets=[t]))
    sub, _ = await batches.claim(
        db,
        "run-1",
        "b",
        worker="w1",
        limit=3,
        lease_seconds=60,
        item_lease_seconds=360,
    )
    assert sub is not None
    assert await batches.submitted(db, sub, worker="w1", provider_batch_id="b_1", poll_in=0)
    assert [s.id for s in await batches.take(db, "run-1", worker="w1", lease_seconds=60)] == [sub]
    assert await batches.cancel_open(db, "run-1", "suspend") == 1  # while the poll is out
    polled = await batches.polled(
        db, sub, worker="w1", status="in_progress", counts={}, poll_in=3600
    )
    assert polled
    (taken,) = await batches.take(db, "run-1", worker="w1", lease_seconds=60)
    assert taken.id == sub and taken.cancel_reason == "suspend"

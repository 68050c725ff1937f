"""The claim hands out no more items of a rate-limited pool than have a slot within the
horizon (``rate_claim_horizon()``): items that could only wait for their slot stay in the
queue, not in a worker that holds their leases (docs/quotas.md)."""

from __future__ import annotations

import asyncio
import contextlib

import asyncpg
import pytest
from test_ratelimit import target

from analysisq.queue import items, runs
from analysisq.settings import Settings
from analysisq.worker import Worker
from support import add_prompts, new_run, spec

pytestmark = [pytest.mark.db, pytest.mark.timeout(120)]

FAST = Settings(
    database_url="unused", poll_seconds=0.05, retry_base_seconds=0.05, retry_cap_seconds=0.5,
    shutdown_grace_seconds=5,
)  # fmt: skip


async def horizon(db: asyncpg.Connection) -> float:
    return float(await db.fetchval("SELECT rate_claim_horizon()"))


async def claim(db: asyncpg.Connection, limit: int = 10) -> list[items.ClaimedItem]:
    return await items.claim(db, "run-1", worker="w", limit=limit, lease_seconds=30)


async def test_a_claim_takes_only_the_slots_within_the_horizon(db: asyncpg.Connection) -> None:
    """1 req/s, a claim of 10: the 2 items whose slots start within 2 s, promised on the
    pool's row; the next claims count the promise (and the reserved schedule) and take what
    starts within the horizon: at most one more, then none."""
    await add_prompts(db, 10)
    await new_run(db, s=spec(targets=[target(requestsPerSecond=1)]))
    assert await horizon(db) == 2.0
    assert len(await claim(db)) == 2
    promised = await db.fetchval(
        "SELECT extract(epoch FROM claim_tat - clock_timestamp())::float8 FROM rate_pools"
    )
    assert 1.5 < promised <= 2.0
    assert len(await claim(db)) <= 1  # a slot at 2 s minus the time since the first claim
    assert await claim(db) == []
    # reserved slots count as promised ones do
    await db.execute(
        "UPDATE rate_pools SET claim_tat = '-infinity',"
        " rate_tat = clock_timestamp() + interval '2.5 s'"
    )
    assert await claim(db) == []
    await db.execute("UPDATE rate_pools SET rate_tat = clock_timestamp() + interval '1.5 s'")
    assert len(await claim(db)) == 1
    # a pool whose schedule is past gives the full horizon again
    await db.execute(
        "UPDATE rate_pools SET rate_tat = now() - interval '1 minute', claim_tat = '-infinity'"
    )
    assert len(await claim(db)) == 2


async def test_a_token_schedule_ahead_of_the_horizon_stops_the_claim(
    db: asyncpg.Connection,
) -> None:
    """tokensPerMinute: the claim cannot count tokens (the estimate is the worker's), so it
    hands out nothing while token_tat is more than the horizon ahead, and a batch otherwise."""
    await add_prompts(db, 6)
    await new_run(db, s=spec(targets=[target(tokensPerMinute=600)]))
    await db.execute("UPDATE rate_pools SET token_tat = clock_timestamp() + interval '3 s'")
    assert await claim(db) == []
    await db.execute("UPDATE rate_pools SET token_tat = clock_timestamp() + interval '1 s'")
    assert len(await claim(db)) == 6


async def test_a_pool_without_room_does_not_hold_back_the_other_targets(
    db: asyncpg.Connection,
) -> None:
    """The slow target's items ahead in the queue take their room and no more: the claim's
    other slots go to the unlimited target."""
    await add_prompts(db, 10)
    await new_run(db, s=spec(targets=[target("slow", requestsPerSecond=1), target("fast")]))
    claimed = await claim(db, limit=8)
    assert len(claimed) == 8
    assert [c.target for c in claimed].count("slow") <= 2


async def until(db: asyncpg.Connection, query: str) -> None:
    """Poll until *query* is true (at most a minute)."""
    for _ in range(3000):
        if await db.fetchval(query):
            return
        await asyncio.sleep(0.02)
    pytest.fail(f"never true: {query}")


async def sample_processing(pool: asyncpg.Pool, seen: list[int], stop: asyncio.Event) -> None:
    """The slow target's items processing, every 20 ms, until *stop*."""
    while not stop.is_set():
        async with pool.acquire() as db:
            seen.append(
                await db.fetchval(
                    "SELECT count(*) FROM analysis_queue"
                    " WHERE target = 'slow' AND status = 'processing'"
                )
            )
        await asyncio.sleep(0.02)


async def test_a_slow_pool_neither_holds_leases_nor_starves_a_fast_target(
    pool: asyncpg.Pool,
) -> None:
    """batchSize 20, a 4 req/s target and an unlimited one, 40 prompts. The worker holds at
    most horizon x rate slow items (8; measured 9 with one answer not yet written), and the
    fast target's 40 items are done before the slow pool has answered 10 (measured: none;
    before: 20, as slow items waiting for their slots filled the worker's slots and the
    fast items got the few they left free)."""
    async with pool.acquire() as db:
        await add_prompts(db, 40)
        s = spec(targets=[target("slow", requestsPerSecond=4), target("fast")], batchSize=20)
        await new_run(db, s=s)
        run = await runs.get_run(db, "run-1")
    worker = Worker(pool, run, FAST, name="w", exit_when_done=True)
    seen: list[int] = []
    stop = asyncio.Event()
    sampling = asyncio.create_task(sample_processing(pool, seen, stop))
    work = asyncio.create_task(worker.run_until_stopped())
    async with pool.acquire() as db:
        await until(
            db,
            "SELECT NOT EXISTS (SELECT 1 FROM analysis_queue"
            " WHERE target = 'fast' AND status <> 'completed')",
        )
        slow_done = await db.fetchval(
            "SELECT count(*) FROM analysis_queue WHERE target = 'slow' AND status = 'completed'"
        )
    await work
    stop.set()
    await sampling
    assert slow_done < 10, slow_done
    # ceil(2 s x 4 req/s) = 8 waiting for their slots, and one or two answered but not yet
    # written (the worker writes answers every 50 ms)
    assert max(seen) <= 8 + 2, max(seen)
    async with pool.acquire() as db:
        assert (await runs.counts(db, "run-1")).done


async def test_a_killed_worker_leaves_at_most_the_horizon_s_slots_unused(
    pool: asyncpg.Pool,
) -> None:
    """A 1 req/s pool, batchSize 10: a worker killed (its task cancelled: no release, no
    write) holds a few items and the pool's schedule is at most the horizon (+ one slot)
    ahead (measured: 2.8 s and 3 items; before: 9.9 s, the 10 slots its 10 claims had
    reserved, and 10 items)."""
    async with pool.acquire() as db:
        await add_prompts(db, 20)
        await new_run(db, s=spec(targets=[target(requestsPerSecond=1)], batchSize=10))
        run = await runs.get_run(db, "run-1")
    worker = Worker(pool, run, FAST, name="w")
    work = asyncio.create_task(worker.run_until_stopped())
    async with pool.acquire() as db:
        await until(db, "SELECT count(*) >= 3 FROM analysis_queue WHERE status <> 'pending'")
    work.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await work
    async with pool.acquire() as db:
        ahead = await db.fetchval(
            "SELECT extract(epoch FROM greatest(rate_tat, claim_tat) - clock_timestamp())::float8"
            " FROM rate_pools"
        )
        held = await db.fetchval("SELECT count(*) FROM analysis_queue WHERE status = 'processing'")
        h = await horizon(db)
    assert ahead <= h + 1.0, ahead
    assert held <= h * 1 + 1, held  # ceil(2 s x 1 req/s), and one answered, not yet written

"""The aggregate rate limit: slots are spaced by 1/rate across every connection."""

from __future__ import annotations

import asyncio
import itertools

import asyncpg
import pytest

from analysisq.queue import ratelimit
from support import new_run, spec

pytestmark = pytest.mark.db


async def test_slots_are_spaced_across_concurrent_workers(pool: asyncpg.Pool) -> None:
    s = spec(targets=[{"name": "t", "provider": "echo", "model": "m",
                       "rateLimit": {"requestsPerSecond": 20}}])  # fmt: skip
    async with pool.acquire() as db:
        await new_run(db, s=s)
    target = s.targets[0]

    async def take(n: int) -> list[float]:
        async with pool.acquire() as db:
            return [await ratelimit.acquire(db, "run-1", target, "hi") for _ in range(n)]

    waits = sorted(w for ws in await asyncio.gather(*(take(10) for _ in range(6))) for w in ws)
    # 60 requests at 20/s: the k-th slot is k/20 s away (first one now), whoever asked
    assert waits[0] < 0.05
    assert 2.85 < waits[-1] < 3.1
    gaps = [b - a for a, b in itertools.pairwise(waits)]
    assert min(gaps) > 0.03  # never two requests in the same slot


async def test_tokens_per_minute_limit(db: asyncpg.Connection) -> None:
    s = spec(targets=[{"name": "t", "provider": "echo", "model": "m",
                       "params": {"max_tokens": 100},
                       "rateLimit": {"tokensPerMinute": 6000}}])  # fmt: skip
    await new_run(db, s=s)
    target = s.targets[0]
    prompt = "x" * 400  # 100 prompt tokens + 100 budget = 200 per request
    waits = [await ratelimit.acquire(db, "run-1", target, prompt) for _ in range(40)]
    # a minute's budget (30 requests) goes at once, then one request every 2 s
    assert all(w == 0 for w in waits[:30])
    assert 1.8 < waits[30] < 2.2
    assert 19 < waits[39] < 21


async def test_retry_after_holds_every_worker_back(db: asyncpg.Connection) -> None:
    s = spec(targets=[{"name": "t", "provider": "echo", "model": "m",
                       "rateLimit": {"requestsPerSecond": 100}}])  # fmt: skip
    await new_run(db, s=s)
    await ratelimit.backoff(db, "run-1", "t", 5.0)
    wait = await ratelimit.acquire(db, "run-1", s.targets[0], "hi")
    assert 4.8 < wait <= 5.05


async def test_unlimited_targets_do_not_touch_the_database(db: asyncpg.Connection) -> None:
    s = spec()
    await new_run(db, s=s)
    await db.execute("DROP TABLE run_targets CASCADE")  # would fail if it were queried
    assert await ratelimit.acquire(db, "run-1", s.targets[0], "hi") == 0.0

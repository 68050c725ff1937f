"""Rate-limit pools: slots spaced by 1/rate and by tokens across every connection and run.

The limiter answers "how long to wait" without sleeping, so these tests read the schedule it
hands out: request k of a 20 req/s pool is k/20 s away, whoever asked.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import random
import time
from typing import Any

import asyncpg
import pytest

from analysisq.completion import Completion
from analysisq.errors import SpecError
from analysisq.providers.echo import EchoProvider
from analysisq.queue import items, quota, ratelimit, runs
from analysisq.queue.retry import RetryPolicy
from analysisq.spec import Target
from analysisq.tokens import estimate
from analysisq.worker.attempt import Attempts
from support import add_prompts, new_run, spec

pytestmark = pytest.mark.db


def target(name: str = "t", **rate: Any) -> dict[str, Any]:
    t: dict[str, Any] = {"name": name, "provider": "echo", "model": "m"}
    if rate:
        t["rateLimit"] = rate
    return t


async def test_slots_are_spaced_across_concurrent_workers(pool: asyncpg.Pool) -> None:
    s = spec(targets=[target(requestsPerSecond=20)])
    async with pool.acquire() as db:
        await new_run(db, s=s)
    name = ratelimit.pool_name("run-1", s.targets[0])

    async def send_time(db: asyncpg.Connection) -> float:
        # the slot as the midpoint of the call + the wait it handed out: a loaded machine or a
        # pooler's extra round trip moves each estimate by at most half a call
        before = time.monotonic()
        wait = (await ratelimit.acquire(db, name, 1)).wait
        return (before + time.monotonic()) / 2 + wait

    async def take(n: int) -> list[float]:
        async with pool.acquire() as db:
            return [await send_time(db) for _ in range(n)]

    sends = sorted(t for ts in await asyncio.gather(*(take(10) for _ in range(6))) for t in ts)
    # 60 requests at 20/s: the k-th slot is k/20 s after the first, whoever asked
    assert 2.85 < sends[-1] - sends[0] < 3.2
    # never more than the rate in any second (one more for a slot on the window's edge)
    assert max(bisect.bisect_right(sends, t + 1.0) - i for i, t in enumerate(sends)) <= 21


async def test_a_named_pool_is_shared_by_two_runs(db: asyncpg.Connection) -> None:
    shared = {"requestsPerSecond": 20, "pool": "team-key"}
    a = spec(targets=[target("gpt", **shared)])
    b = spec(targets=[target("other-name", **shared)])
    await new_run(db, "run-a", a)
    await new_run(db, "run-b", b)
    assert ratelimit.pool_name("run-a", a.targets[0]) == "team-key"
    # the two runs alternate on one schedule: 40 requests take 2 s, not 1 s (send times are
    # read as clock + wait, so a slow machine between two calls changes nothing)
    names = [ratelimit.pool_name(r, s.targets[0]) for r, s in (("run-a", a), ("run-b", b))]
    sends = []
    for _ in range(20):
        for name in names:
            sends.append((await ratelimit.acquire(db, name, 1)).wait + time.monotonic())
    assert 1.9 < sends[-1] - sends[0] < 2.1
    assert min(y - x for x, y in itertools.pairwise(sends)) > 0.03


async def test_targets_without_a_pool_keep_a_limit_of_their_own(db: asyncpg.Connection) -> None:
    s = spec(targets=[target(requestsPerSecond=1)])
    await new_run(db, "run-a", s)
    await new_run(db, "run-b", s)
    first = await ratelimit.acquire(db, ratelimit.pool_name("run-a", s.targets[0]), 1)
    other = await ratelimit.acquire(db, ratelimit.pool_name("run-b", s.targets[0]), 1)
    assert first.wait == other.wait == 0.0


async def test_tokens_per_minute_spread_evenly(db: asyncpg.Connection) -> None:
    s = spec(targets=[target(tokensPerMinute=6000) | {"params": {"max_tokens": 100}}])
    await new_run(db, s=s)
    t = s.targets[0]
    cost = estimate(t, "x" * 400).total
    assert cost == 200  # 100 prompt tokens + the 100 max_tokens ceiling
    name = ratelimit.pool_name("run-1", t)
    first = (await ratelimit.acquire(db, name, cost)).wait
    sends = [(await ratelimit.acquire(db, name, cost)).wait + time.monotonic() for _ in range(9)]
    # 6000 tokens a minute = 100/s: a 200-token request every 2 s, no burst
    assert first < 0.05
    assert all(1.9 < y - x < 2.1 for x, y in itertools.pairwise(sends))


def peak_in_window(sent: list[tuple[float, int]], window: float) -> int:
    """The most tokens whose send times fall inside any window of *window* seconds."""
    return max(sum(n for t, n in sent if start <= t < start + window) for start, _ in sent)


@pytest.mark.parametrize("factor", [1.5, 0.5])
async def test_usage_reconciliation_holds_tokens_per_minute(
    db: asyncpg.Connection, factor: float
) -> None:
    """Answers reporting 150% (50%) of the estimate: the limit holds within 10% a minute."""
    tpm = 60_000
    s = spec(targets=[target(tokensPerMinute=tpm) | {"params": {"max_tokens": 900}}])
    await new_run(db, s=s)
    t = s.targets[0]
    name = ratelimit.pool_name("run-1", t)
    est = estimate(t, "x" * 400).total  # 1000 tokens
    sent: list[tuple[float, int]] = []  # (send time, tokens used)
    start = time.monotonic()
    while not sent or sent[-1][0] - start < 180:
        at = (await ratelimit.acquire(db, name, est)).wait + time.monotonic()
        used = round(est * factor)
        await ratelimit.settle_tokens(db, name, used - est)
        sent.append((at, used))
    peak = peak_in_window(sent, 60.0)
    assert tpm * 0.9 <= peak <= tpm * 1.1, (peak, tpm)


async def test_retry_after_holds_every_worker_back(db: asyncpg.Connection) -> None:
    s = spec(targets=[target(requestsPerSecond=100)])
    await new_run(db, s=s)
    name = ratelimit.pool_name("run-1", s.targets[0])
    await ratelimit.backoff(db, "run-1", "t", 5.0)
    wait = (await ratelimit.acquire(db, name, 1)).wait
    assert 4.8 < wait <= 5.05


async def test_retry_after_reaches_unlimited_targets_through_the_claim(
    db: asyncpg.Connection,
) -> None:
    """A target without any limit sends without asking the limiter: the claim is what holds
    it back. While its pool is blocked no item of it is handed out (a claim could only wait,
    holding its lease and exposed to its worker's death); another target's items are, and
    the blocked target's come once the block ends."""
    await add_prompts(db, 2)
    s = spec(targets=[target(), target("u")])
    await new_run(db, s=s)
    await ratelimit.backoff(db, "run-1", "t", 5.0)
    claimed = await items.claim(db, "run-1", worker="w", limit=4, lease_seconds=30)
    assert sorted(c.target for c in claimed) == ["u", "u"]
    assert await items.claim(db, "run-1", worker="w", limit=4, lease_seconds=30) == []
    await db.execute("UPDATE rate_pools SET blocked_until = now() - interval '1 second'")
    claimed = await items.claim(db, "run-1", worker="w", limit=4, lease_seconds=30)
    assert sorted(c.target for c in claimed) == ["t", "t"]


async def test_unlimited_targets_do_not_touch_the_limiter(db: asyncpg.Connection) -> None:
    assert not ratelimit.is_limited(Target.model_validate(target()))
    assert ratelimit.is_limited(Target.model_validate(target(tokensPerMinute=10)))


async def test_conflicting_limits_of_a_shared_pool_are_refused(db: asyncpg.Connection) -> None:
    await new_run(db, "run-a", spec(targets=[target(requestsPerSecond=20, pool="key-1")]))
    other = spec(targets=[target(), target("u", requestsPerSecond=50, pool="key-1")])
    with pytest.raises(SpecError) as err:
        await runs.create_run(db, "run-b", other)
    assert "targets.1.rateLimit" in err.value.message
    assert "run-a (t)" in err.value.message and "requestsPerSecond=20" in err.value.message
    assert await db.fetchval("SELECT count(*) FROM analysis_runs WHERE id = 'run-b'") == 0
    # once run-a is finished, a new run may set the pool's limits
    await runs.mark_finished(db, "run-a")
    await runs.create_run(db, "run-b", other)
    assert (
        await db.fetchval("SELECT requests_per_second FROM rate_pools WHERE name = 'key-1'") == 50
    )


async def test_deleting_a_run_drops_its_private_pools(db: asyncpg.Connection) -> None:
    await new_run(db, "run-a", spec(targets=[target(), target("u", pool="shared")]))
    await new_run(db, "run-b", spec(targets=[target("v", pool="shared"), target("w")]))
    await runs.delete_run(db, "run-a")
    names = {r[0] for r in await db.fetch("SELECT name FROM rate_pools")}
    assert names == {"shared", "run:run-b:w"}


async def test_an_answer_with_an_exhausted_limit_blocks_the_pool(pool: asyncpg.Pool) -> None:
    """The provider's headers said remaining 0, reset in 3 s: nobody sends before then."""
    s = spec(targets=[target(pool="key")])
    async with pool.acquire() as db:
        await new_run(db, s=s)
    t = s.targets[0]
    grant = await quota.reserve(pool, "run-1", s, t, "hi")
    answer = Completion("ok", None, 1, 1, "m", 1.0, limit_reset_s=3.0)
    await quota.settle(pool, grant, answer)
    async with pool.acquire() as db:
        wait = (await ratelimit.acquire(db, "key", 1)).wait
    assert 2.8 < wait <= 3.05


async def test_only_a_target_without_limits_reuses_its_grant(
    pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request to a target without rate limit in a run without budget reserves nothing,
    so the attempts reuse its one grant; a limited target still reserves every request."""
    s = spec(targets=[target("free"), target("limited", requestsPerSecond=1000)])
    async with pool.acquire() as db:
        await add_prompts(db, 4)
        await new_run(db, s=s)
        claimed = await items.claim(db, "run-1", worker="w", limit=8, lease_seconds=60)
    reserved: list[str] = []
    real = quota.reserve

    async def counted(*args: Any) -> quota.Grant:
        reserved.append(args[3].name)
        return await real(*args)

    monkeypatch.setattr(quota, "reserve", counted)
    attempts = Attempts(
        pool,
        s,
        {t.name: EchoProvider(t) for t in s.targets},
        RetryPolicy(base_seconds=1, cap_seconds=1),
        rng=random.Random(1),
        clock=time.monotonic,
    )
    answers = [await attempts.run(i) for i in claimed]
    assert len(claimed) == 8 and all(isinstance(a, Completion) for a in answers)
    assert sorted(reserved) == ["free"] + ["limited"] * 4

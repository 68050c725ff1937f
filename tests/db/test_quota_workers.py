"""Quotas end to end: workers of two runs on one pool, Retry-After, budgets, measured at the
fake provider (its request and token peaks) and in the queue's rows."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import pytest

from analysisq.fake_provider.config import FakeConfig
from analysisq.fake_provider.server import FakeProvider
from analysisq.queue import budget, runs
from analysisq.queue.states import Counts
from analysisq.settings import Settings
from analysisq.spec import AnalysisRunSpec, parse_spec
from analysisq.tokens import estimate
from analysisq.worker import Worker, WorkerStats
from support import add_prompts, new_run, spec

pytestmark = [pytest.mark.db, pytest.mark.timeout(180)]

FAST = Settings(
    database_url="unused", poll_seconds=0.05, retry_base_seconds=0.05, retry_cap_seconds=0.5,
    shutdown_grace_seconds=5,
)  # fmt: skip


def fake_target(url: str, name: str = "fake", **kw: Any) -> dict[str, Any]:
    return {"name": name, "provider": "openai", "model": "m", "endpoint": url, **kw}


def workers(pool: asyncpg.Pool, run: runs.Run, n: int, **kw: Any) -> list[Worker]:
    return [Worker(pool, run, FAST, name=f"{run.id}-w{i}", **kw) for i in range(n)]


async def drain(pool: asyncpg.Pool, run_ids: list[str], n: int = 2) -> list[WorkerStats]:
    async with pool.acquire() as db:
        found = [await runs.get_run(db, r) for r in run_ids]
    ws = [w for run in found for w in workers(pool, run, n, exit_when_done=True)]
    return await asyncio.gather(*(w.run_until_stopped() for w in ws))


def with_changes(s: AnalysisRunSpec, **changes: Any) -> AnalysisRunSpec:
    return parse_spec({**s.to_json(), **changes})


async def two_runs(pool: asyncpg.Pool, a: AnalysisRunSpec, b: AnalysisRunSpec, n: int) -> None:
    """Runs run-a (prompts tagged a) and run-b (tagged b), *n* prompts each."""
    async with pool.acquire() as db:
        await add_prompts(db, n, prefix="a", tags=["a"])
        await add_prompts(db, n, prefix="b", tags=["b"], text="What does b make of {i}?")
        for run_id, s, tag in (("run-a", a, "a"), ("run-b", b, "b")):
            await new_run(db, run_id, with_changes(s, prompts={"tags": [tag]}))


async def test_two_runs_on_one_pool_share_its_requests_per_second(pool: asyncpg.Pool) -> None:
    """Two runs of 130 prompts each, 2 workers each, on a 20 req/s pool: at the provider,
    never more than 20 req/s + 10% in any 10 s window (each run alone may send 20 req/s)."""
    async with FakeProvider(FakeConfig()) as fake:
        limit = {"requestsPerSecond": 20, "pool": "team-key"}
        a = spec(targets=[fake_target(fake.url, rateLimit=limit)], batchSize=10)
        b = spec(targets=[fake_target(fake.url, "other", rateLimit=limit)], batchSize=10)
        await two_runs(pool, a, b, 130)
        await drain(pool, ["run-a", "run-b"])
        st = fake.stats()
    assert st.completions == 260 and st.prompts_completed_more_than_once == 0
    assert st.elapsed_s >= 10  # a 10 s window was really tested
    assert st.max_requests_10s <= 20 * 10 * 1.1


async def test_two_runs_on_one_pool_share_its_tokens_per_minute(pool: asyncpg.Pool) -> None:
    """A 12,000 tokens/min pool (200/s); each request reserves about 300 tokens and the
    provider reports 50% more: in any 10 s window at most 2,000 tokens + 10%."""
    async with FakeProvider(FakeConfig(usage_factor=1.5)) as fake:
        limit = {"tokensPerMinute": 12_000, "pool": "team-key"}
        params = {"max_tokens": 200}
        a = spec(targets=[fake_target(fake.url, rateLimit=limit, params=params)])
        b = spec(targets=[fake_target(fake.url, "other", rateLimit=limit, params=params)])
        await two_runs(pool, a, b, 10)
        await drain(pool, ["run-a", "run-b"])
        st = fake.stats()
    assert st.completions == 20
    assert st.elapsed_s >= 10
    assert st.max_tokens_10s <= 12_000 / 6 * 1.1, st


async def blocked_until(pool: asyncpg.Pool, name: str) -> float:
    async with pool.acquire() as db:
        value = await db.fetchval(
            "SELECT extract(epoch FROM blocked_until) FROM rate_pools WHERE name = $1", name
        )
    return float(value)


async def first_429(pool: asyncpg.Pool, fake: FakeProvider, run_id: str) -> None:
    """One worker of *run_id* meets the provider's 429 (Retry-After: 5), then stops."""
    async with pool.acquire() as db:
        run = await runs.get_run(db, run_id)
    (w,) = workers(pool, run, 1)
    task = asyncio.create_task(w.run_until_stopped())
    for _ in range(1000):
        if fake.stats().by_status.get("429", 0) >= 1:
            break
        await asyncio.sleep(0.01)
    w.stop()
    await task


@pytest.mark.parametrize("limit", [{"pool": "team-key"}, {"tokensPerMinute": 100_000}, None])
async def test_retry_after_holds_back_every_worker_of_the_pool(
    pool: asyncpg.Pool, limit: dict[str, Any] | None
) -> None:
    """A 429 with Retry-After: 5 to run a's request: no request of run b's workers (a shared
    pool) or of the run's other workers (a target limited by tokens only, or not at all)
    reaches the provider before the 5 s are over."""
    async with FakeProvider(FakeConfig(errors={"429": 1.0}, retry_after_s=5)) as fake:
        extra = {} if limit is None else {"rateLimit": limit}
        a = spec(targets=[fake_target(fake.url, **extra)], batchSize=1)
        shared = limit is not None and "pool" in limit
        b = spec(targets=[fake_target(fake.url, "other", **extra)]) if shared else a
        await two_runs(pool, a, b, 5)
        sent = time.time()
        await first_429(pool, fake, "run-a")
        answered = time.time()  # the 429 came between sent and answered, however slow
        name = "team-key" if shared else "run:run-a:fake"
        until = await blocked_until(pool, name)
        assert sent + 4.5 < until < answered + 5.5, (until - sent, until - answered)
        fake.configure(FakeConfig())
        fake.reset()
        await drain(pool, ["run-b" if shared else "run-a"])
        st = fake.stats()
    assert st.first_request_at is not None
    assert st.first_request_at >= until - 0.05, (st.first_request_at, until)


async def paused_for_budget(pool: asyncpg.Pool) -> tuple[budget.BudgetState, Counts]:
    """Wait until run-1 is paused for its budget with nothing in flight."""
    async with pool.acquire() as db:
        for _ in range(500):
            state = await budget.state(db, "run-1")
            counts = await runs.counts(db, "run-1")
            if state and state.exhausted and counts.processing == 0:
                return state, counts
            await asyncio.sleep(0.05)
    raise AssertionError(f"run-1 was not paused for its budget: {state}, {counts}")


async def test_budget_stops_the_run_with_the_items_that_fit_then_resumes(
    pool: asyncpg.Pool,
) -> None:
    """Each answer costs exactly its estimate (usage = prompt + max_tokens); the budget
    covers 10 of 20 items: 10 complete, 10 stay pending (none failed, no attempt spent), the
    run is paused for its budget; a larger budget completes it."""
    async with FakeProvider(FakeConfig(usage_factor=1.0)) as fake:
        pricing = {"inputPerMillionTokens": 1000, "outputPerMillionTokens": 1000}
        t = fake_target(fake.url, pricing=pricing, params={"max_tokens": 100})
        probe = spec(targets=[t])
        async with pool.acquire() as db:
            await add_prompts(db, 20, text="Prompt number {i:03d} of twenty.")
        per_item = estimate(probe.targets[0], "Prompt number 000 of twenty.").total / 1000
        s = spec(targets=[t], batchSize=3, budget={"maxCost": per_item * 10.5})
        async with pool.acquire() as db:
            await new_run(db, s=s)
            run = await runs.get_run(db, "run-1")
        ws = workers(pool, run, 2, exit_when_done=True)
        tasks = [asyncio.create_task(w.run_until_stopped()) for w in ws]
        state, counts = await paused_for_budget(pool)
        async with pool.acquire() as db:
            assert counts.completed == 10 and counts.pending == 10 and counts.failed_for_good == 0
            attempts = await db.fetchval(
                "SELECT max(attempts) FROM analysis_queue WHERE status = 'pending'"
            )
            assert attempts == 0
            assert state.spent_cost <= state.max_cost  # type: ignore[operator]
            assert fake.stats().requests == 10
            await runs.create_run(db, "run-1", with_changes(s, budget={"maxCost": per_item * 30}))
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
        async with pool.acquire() as db:
            counts = await runs.counts(db, "run-1")
            final = await budget.state(db, "run-1")
        assert counts.completed == 20 and fake.stats().requests == 20
        assert final is not None and not final.exhausted
        assert abs(final.spent_cost - per_item * 20) < 1e-9


async def test_budget_overshoot_stays_within_the_in_flight_bound(pool: asyncpg.Pool) -> None:
    """The provider reports 50% more tokens than reserved: the run overspends by at most
    what its requests in flight under-reserved (concurrency x 50% of one estimate)."""
    async with FakeProvider(FakeConfig(usage_factor=1.5, latency_ms=50)) as fake:
        t = fake_target(fake.url, params={"max_tokens": 100})
        s = spec(targets=[t], batchSize=3, budget={"maxTokens": 3000})
        async with pool.acquire() as db:
            await add_prompts(db, 40, text="Prompt number {i:03d} of forty.")
            await new_run(db, s=s)
            run = await runs.get_run(db, "run-1")
        ws = workers(pool, run, 2)
        tasks = [asyncio.create_task(w.run_until_stopped()) for w in ws]
        state, counts = await paused_for_budget(pool)
        for w in ws:
            w.stop()
        await asyncio.gather(*tasks)
    assert state.reserved_tokens == 0
    est = estimate(s.targets[0], "Prompt number 000 of forty.").total
    in_flight = 2 * 3
    assert state.spent_tokens > 3000  # the provider did charge more than reserved
    assert state.spent_tokens <= 3000 + in_flight * 0.5 * est + in_flight
    assert counts.failed_for_good == 0 and counts.completed + counts.pending == 40

"""The worker against a real PostgreSQL and the fake provider, in one event loop.

Several ``Worker`` objects drain one run concurrently; the fake provider injects the faults
and counts what it was asked, so each property is checked from both sides: the queue's rows
and the provider's requests.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

from analysisq.completion import Completion
from analysisq.errors import ErrorClass
from analysisq.fake_provider.config import FakeConfig
from analysisq.fake_provider.server import FakeProvider
from analysisq.queue import items, runs
from analysisq.queue.runs import Run
from analysisq.settings import Settings
from analysisq.spec import AnalysisRunSpec
from analysisq.worker import Worker, WorkerStats
from support import add_prompts, new_run, spec

pytestmark = [pytest.mark.db, pytest.mark.timeout(120)]

FAST = Settings(
    database_url="unused", poll_seconds=0.05, retry_base_seconds=0.05, retry_cap_seconds=0.5,
    shutdown_grace_seconds=5,
)  # fmt: skip


def fake_target(url: str, **kw: Any) -> dict[str, Any]:
    return {"name": "fake", "provider": "openai", "model": "m", "endpoint": url, **kw}


async def drain(
    pool: asyncpg.Pool, s: AnalysisRunSpec, n_workers: int = 3, settings: Settings = FAST
) -> list[WorkerStats]:
    async with pool.acquire() as conn:
        run: Run = await runs.get_run(conn, "run-1")
    workers = [
        Worker(pool, run, settings, name=f"w{i}", exit_when_done=True) for i in range(n_workers)
    ]
    return await asyncio.gather(*(w.run_until_stopped() for w in workers))


async def check_invariants(db: asyncpg.Connection) -> dict[str, int]:
    """Every item terminal, none stuck, one result per completed item."""
    counts = await runs.counts(db, "run-1")
    assert counts.done, counts
    assert counts.stuck == counts.processing == counts.pending == counts.retrying == 0
    results = await db.fetchval("SELECT count(*) FROM analysis_results")
    distinct = await db.fetchval("SELECT count(DISTINCT queue_id) FROM analysis_results")
    assert results == distinct == counts.completed
    return counts.as_dict()


async def test_workers_drain_a_run_each_item_once(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as db:
        await add_prompts(db, 300)
        await new_run(db, s=spec(batchSize=7))
    stats = await drain(pool, spec())
    assert sum(s.completed for s in stats) == 300
    assert sum(s.claimed for s in stats) == 300  # nobody claimed an item twice
    assert sum(1 for s in stats if s.completed) == 3  # the work was shared
    async with pool.acquire() as db:
        assert (await check_invariants(db))["completed"] == 300
        row = await db.fetchrow("SELECT * FROM analysis_results LIMIT 1")
        assert row["model"] == "echo-1" and row["attempt"] == 1 and row["latency_ms"] >= 0


async def test_transient_errors_are_retried_to_completion(pool: asyncpg.Pool) -> None:
    """Each prompt fails its first two requests (503): all complete on attempt 3 of 3."""
    async with FakeProvider(FakeConfig(fail_first=2)) as fake:
        s = spec(targets=[fake_target(fake.url)], maxAttempts=3)
        async with pool.acquire() as db:
            await add_prompts(db, 60)
            await new_run(db, s=s)
        await drain(pool, s)
        st = fake.stats()
    async with pool.acquire() as db:
        assert (await check_invariants(db))["completed"] == 60
        attempts = {r[0] for r in await db.fetch("SELECT attempt FROM analysis_results")}
    assert attempts == {3}
    assert st.requests == 180 and st.completions == 60
    assert st.prompts_completed_more_than_once == 0


async def test_random_transient_errors_within_three_attempts(pool: asyncpg.Pool) -> None:
    """20% 500s and malformed bodies: at most 0.2^3 of items may exhaust their attempts."""
    cfg = FakeConfig(errors={"500": 0.1, "malformed": 0.1}, seed=7)
    async with FakeProvider(cfg) as fake:
        s = spec(targets=[fake_target(fake.url)])
        async with pool.acquire() as db:
            await add_prompts(db, 200)
            await new_run(db, s=s)
        await drain(pool, s)
    async with pool.acquire() as db:
        counts = await check_invariants(db)
        failed = await db.fetch("SELECT attempts, error_class FROM analysis_queue"
                                " WHERE status = 'failed'")  # fmt: skip
    assert counts["completed"] >= 194
    assert all(tuple(r) == (3, "transient") for r in failed)


async def test_permanent_errors_fail_at_once(pool: asyncpg.Pool) -> None:
    async with FakeProvider(FakeConfig(max_prompt_chars=50)) as fake:
        s = spec(targets=[fake_target(fake.url)])
        async with pool.acquire() as db:
            await add_prompts(db, 10, prefix="short", text="short {i}")
            await add_prompts(db, 5, prefix="long", text="a much longer prompt {i} " * 5)
            await new_run(db, s=s)
        await drain(pool, s)
        assert fake.stats().requests == 15  # no retry of a permanent error
    async with pool.acquire() as db:
        counts = await check_invariants(db)
        rows = await db.fetch("SELECT attempts, error_class, error_message FROM analysis_queue"
                              " WHERE status = 'failed'")  # fmt: skip
    assert (counts["completed"], counts["failed"]) == (10, 5)
    assert {(r["attempts"], r["error_class"]) for r in rows} == {(1, "invalid_input")}
    assert all("400" in r["error_message"] for r in rows)


async def test_oversized_prompt_fails_without_a_request(pool: asyncpg.Pool) -> None:
    async with FakeProvider() as fake:
        s = spec(targets=[fake_target(fake.url)], maxPromptChars=20)
        async with pool.acquire() as db:
            await add_prompts(db, 3, text="x" * 30 + "{i}")
            await new_run(db, s=s)
        await drain(pool, s, n_workers=1)
        assert fake.stats().requests == 0
    async with pool.acquire() as db:
        msg = await db.fetchval("SELECT error_message FROM analysis_queue LIMIT 1")
    assert "limit is 20" in msg and "p00000" in msg


async def test_auth_failure_pauses_the_target_without_burning_items(pool: asyncpg.Pool) -> None:
    secret = "sk-test-0123456789abcdef"
    async with FakeProvider(FakeConfig(require_api_key=secret)) as fake:
        s = spec(targets=[fake_target(fake.url, apiKeyEnv="AQ_TEST_KEY")])
        async with pool.acquire() as db:
            await add_prompts(db, 40)
            await new_run(db, s=s)
            run = await runs.get_run(db, "run-1")
        import os

        os.environ["AQ_TEST_KEY"] = "sk-wrong-key-000000"
        try:
            w = Worker(pool, run, FAST, name="w")
            task = asyncio.create_task(w.run_until_stopped())
            for _ in range(100):
                async with pool.acquire() as db:
                    paused = [t for t in await runs.targets(db, "run-1") if t.paused_at]
                if paused:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)
            w.stop()
            await task
            requests_while_paused = fake.stats().requests
            assert requests_while_paused <= 2 * s.batch_size  # the in-flight ones, no more
            async with pool.acquire() as db:
                assert paused and "401" in (paused[0].pause_reason or "")
                assert secret not in (paused[0].pause_reason or "")
                counts = await runs.counts(db, "run-1")
                assert (counts.pending, counts.failed_for_good) == (40, 0)
                assert await db.fetchval("SELECT max(attempts) FROM analysis_queue") == 0
                # fix the key, resume the target: everything completes
                os.environ["AQ_TEST_KEY"] = secret
                assert await runs.resume_targets(db, "run-1") == ["fake"]
            await drain(pool, s, n_workers=2)
        finally:
            os.environ.pop("AQ_TEST_KEY", None)
    async with pool.acquire() as db:
        assert (await check_invariants(db))["completed"] == 40


async def test_aggregate_rate_limit_and_429s(pool: asyncpg.Pool) -> None:
    """4 workers share 40 req/s for over 10 s; the provider caps at 40 req/s (429 above)."""
    cfg = FakeConfig(rate_limit_rps=40, errors={"429": 0.05}, retry_after_s=0.3, seed=3)
    async with FakeProvider(cfg) as fake:
        s = spec(targets=[fake_target(fake.url, rateLimit={"requestsPerSecond": 40})],
                 batchSize=10)  # fmt: skip
        async with pool.acquire() as db:
            await add_prompts(db, 480)
            await new_run(db, s=s)
        await drain(pool, s, n_workers=4)
        st = fake.stats()
    async with pool.acquire() as db:
        assert (await check_invariants(db))["completed"] == 480
        burned = await db.fetchval("SELECT max(attempt) FROM analysis_results")
        deferred = await db.fetchval("SELECT sum(deferrals) FROM analysis_queue")
    # 480 requests at 40/s cannot take less than 12 s, so a 10 s window was really tested:
    # without the shared limit 4 x 10 concurrent requests would arrive far faster.
    assert st.elapsed_s >= 10
    assert st.max_requests_10s <= 40 * 10 * 1.1
    assert deferred > 0 and burned == 1  # 429s were deferred, no attempt burned


async def test_shutdown_releases_in_flight_items_uncounted(pool: asyncpg.Pool) -> None:
    async with FakeProvider(FakeConfig(latency_ms=5000)) as fake:
        s = spec(targets=[fake_target(fake.url)])
        async with pool.acquire() as db:
            await add_prompts(db, 10)
            await new_run(db, s=s)
            run = await runs.get_run(db, "run-1")
        settings = FAST.model_copy(update={"shutdown_grace_seconds": 0.2})
        w = Worker(pool, run, settings, name="w")
        task = asyncio.create_task(w.run_until_stopped())
        for _ in range(250):
            if fake.stats().requests >= 5:
                break
            await asyncio.sleep(0.02)
        w.stop()
        stats = await asyncio.wait_for(task, 5)
    assert stats.released == 10  # 5 running, 5 prefetched (tests/db/test_worker_prefetch.py)
    assert fake.stats().requests == 5
    async with pool.acquire() as db:
        rows = await db.fetch("SELECT status, attempts FROM analysis_queue")
    assert {tuple(r) for r in rows} == {("pending", 0)}


async def test_heartbeat_keeps_a_slow_item_from_being_rescued(pool: asyncpg.Pool) -> None:
    """A request slower than the lease completes once: the heartbeat renews the lease."""
    async with FakeProvider(FakeConfig(latency_ms=7000)) as fake:
        s = spec(targets=[fake_target(fake.url)], leaseSeconds=5, batchSize=2)
        async with pool.acquire() as db:
            await add_prompts(db, 2)
            await new_run(db, s=s)
        await drain(pool, s, n_workers=2)
        assert fake.stats().requests == 2
    async with pool.acquire() as db:
        counts = await check_invariants(db)
        losses = await db.fetchval("SELECT max(lease_losses) FROM analysis_queue")
    assert counts["completed"] == 2 and losses == 0


async def test_an_item_of_an_unknown_target_fails_clearly(pool: asyncpg.Pool) -> None:
    """A run whose spec no longer has an item's target fails that item, and only it."""
    two = [{"name": "a", "provider": "echo", "model": "m"},
           {"name": "b", "provider": "echo", "model": "m"}]  # fmt: skip
    async with pool.acquire() as db:
        await add_prompts(db, 5)
        await new_run(db, s=spec(targets=two))
        await db.execute(
            "UPDATE analysis_runs SET spec = jsonb_set(spec, '{targets}', spec->'targets'->0 "
            "|| '[]'::jsonb)"
        )
    await drain(pool, spec())
    async with pool.acquire() as db:
        counts = await check_invariants(db)
        msgs = {r[0] for r in await db.fetch("SELECT error_message FROM analysis_queue"
                                             " WHERE status = 'failed'")}  # fmt: skip
    assert (counts["completed"], counts["failed"]) == (5, 5)
    assert len(msgs) == 5 and all("unknown target 'b'" in m for m in msgs)


class _Broken:
    """A provider whose client code fails in a way no error class foresaw."""

    def __init__(self, target: Any, answer: str | None = None) -> None:
        self.target = target
        self.answer = answer

    async def complete(self, prompt: str) -> Completion:
        if self.answer is None:
            raise RuntimeError("boom")
        return Completion(self.answer, {"nul": "a\x00b"}, 1, 1, "m\x00", 1.0)


async def test_an_unexpected_error_on_the_last_attempt_fails_for_good(pool: asyncpg.Pool) -> None:
    s = spec(maxAttempts=2)
    async with pool.acquire() as db:
        await add_prompts(db, 3)
        await new_run(db, s=s)
        run = await runs.get_run(db, "run-1")
    w = Worker(pool, run, FAST, name="w", exit_when_done=True,
               providers={"echo": _Broken(s.targets[0])})  # fmt: skip
    await asyncio.wait_for(w.run_until_stopped(), 30)
    async with pool.acquire() as db:
        counts = await check_invariants(db)
        rows = await db.fetch("SELECT attempts, error_class, error_message FROM analysis_queue")
    assert counts["failed"] == 3 and counts["retrying"] == 0
    assert {(r["attempts"], r["error_class"]) for r in rows} == {(2, "transient")}
    assert all("internal error" in r["error_message"] for r in rows)


async def test_a_nul_in_an_answer_is_stored_not_fatal(pool: asyncpg.Pool) -> None:
    s = spec()
    async with pool.acquire() as db:
        await add_prompts(db, 4)
        await new_run(db, s=s)
        run = await runs.get_run(db, "run-1")
    w = Worker(pool, run, FAST, name="w", exit_when_done=True,
               providers={"echo": _Broken(s.targets[0], answer="x\x00y")})  # fmt: skip
    await asyncio.wait_for(w.run_until_stopped(), 30)
    async with pool.acquire() as db:
        assert (await check_invariants(db))["completed"] == 4
        row = await db.fetchrow("SELECT response_text, model, parsed FROM analysis_results LIMIT 1")
    assert row["response_text"] == "x\ufffdy" and row["model"] == "m\ufffd"


async def test_lowering_max_attempts_ends_exhausted_retries(db: asyncpg.Connection) -> None:
    await add_prompts(db, 2)
    await new_run(db, s=spec(maxAttempts=3))
    a, b = await items.claim(db, "run-1", worker="w", limit=2, lease_seconds=60)
    assert await items.fail(db, a, ErrorClass.TRANSIENT, "503", 60.0)
    assert await items.fail(db, b, ErrorClass.TRANSIENT, "503", 60.0)
    assert (await runs.counts(db, "run-1")).retrying == 2
    await runs.create_run(db, "run-1", spec(maxAttempts=1))  # the operator's reconfigure
    counts = await runs.counts(db, "run-1")
    assert (counts.retrying, counts.failed_for_good, counts.done) == (0, 2, True)

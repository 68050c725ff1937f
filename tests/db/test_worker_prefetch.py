"""Prefetch: a worker holds one batch of claims beyond ``batchSize``, never more running.

A provider that answers only when the test lets it shows, from the queue's rows and from the
provider's side, that the next batch is claimed while a batch runs, that no more than
``batchSize`` requests are ever in flight, and what happens to the prefetched claims when the
worker stops (released, attempts unspent) or dies (rescued, each item completed once).
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

from analysisq.completion import Completion
from analysisq.errors import AuthError
from analysisq.queue import rescue, runs
from analysisq.queue.runs import Run
from analysisq.settings import Settings
from analysisq.worker import Worker
from support import add_prompts, new_run, spec

pytestmark = [pytest.mark.db, pytest.mark.timeout(120)]

FAST = Settings(database_url="unused", poll_seconds=0.05, shutdown_grace_seconds=5)
BATCH = 5


class Gated:
    """Answers only once ``gate`` is set; counts the requests it was sent and holds."""

    def __init__(self, target: Any) -> None:
        self.target = target
        self.gate = asyncio.Event()
        self.sent = 0
        self.running = 0
        self.most = 0

    async def complete(self, prompt: str) -> Completion:
        self.sent += 1
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await self.gate.wait()
        finally:
            self.running -= 1
        return Completion(f"answer to {prompt}", None, 1, 1, "m", 1.0)


async def start(pool: asyncpg.Pool, n: int, **kw: Any) -> tuple[Run, Gated]:
    s = spec(batchSize=BATCH, **kw)
    async with pool.acquire() as db:
        await add_prompts(db, n)
        await new_run(db, s=s)
        run = await runs.get_run(db, "run-1")
    return run, Gated(s.targets[0])


async def holds(pool: asyncpg.Pool, worker: str) -> int:
    """The claims *worker* holds, as the queue says."""
    async with pool.acquire() as db:
        return int(
            await db.fetchval(
                "SELECT count(*) FROM analysis_queue WHERE status = 'processing'"
                " AND lease_owner = $1",
                worker,
            )
        )


async def held_by(pool: asyncpg.Pool, worker: str, n: int) -> int:
    """Wait (at most 10 s) until *worker* holds *n* claims; the number it holds then."""
    for _ in range(200):
        if (held := await holds(pool, worker)) >= n:
            return held
        await asyncio.sleep(0.05)
    return held


async def test_the_next_batch_is_claimed_while_a_batch_runs(pool: asyncpg.Pool) -> None:
    run, gated = await start(pool, 4 * BATCH)
    w = Worker(pool, run, FAST, name="w", exit_when_done=True, providers={"echo": gated})
    task = asyncio.create_task(w.run_until_stopped())
    assert await held_by(pool, "w", 2 * BATCH) == 2 * BATCH  # a batch runs, one more is held
    await asyncio.sleep(0.3)  # and it stays at one more: the worker claims nothing beyond
    assert await holds(pool, "w") == 2 * BATCH
    assert (gated.running, gated.sent) == (BATCH, BATCH)  # batchSize bounds what runs
    gated.gate.set()
    stats = await asyncio.wait_for(task, 60)
    assert (stats.completed, stats.claimed, gated.sent) == (4 * BATCH, 4 * BATCH, 4 * BATCH)
    assert gated.most == BATCH
    async with pool.acquire() as db:
        counts = await runs.counts(db, "run-1")
        results = await db.fetchval("SELECT count(DISTINCT queue_id) FROM analysis_results")
    assert counts.completed == results == 4 * BATCH


async def test_a_graceful_stop_hands_prefetched_claims_back_unspent(pool: asyncpg.Pool) -> None:
    run, gated = await start(pool, 4 * BATCH)
    w = Worker(pool, run, FAST, name="w", providers={"echo": gated})
    task = asyncio.create_task(w.run_until_stopped())
    assert await held_by(pool, "w", 2 * BATCH) == 2 * BATCH
    w.stop()
    gated.gate.set()  # the running batch answers within the grace period
    stats = await asyncio.wait_for(task, 30)
    # The running batch was written; the prefetched one never started and went back.
    assert (stats.completed, stats.released, gated.sent) == (BATCH, BATCH, BATCH)
    async with pool.acquire() as db:
        rows = await db.fetch("SELECT status, attempts, count(*) AS n FROM analysis_queue"
                              " GROUP BY 1, 2")  # fmt: skip
    assert {tuple(r) for r in rows} == {("completed", 1, BATCH), ("pending", 0, 3 * BATCH)}


async def test_a_dead_workers_prefetched_claims_are_rescued(pool: asyncpg.Pool) -> None:
    run, gated = await start(pool, 4 * BATCH, leaseSeconds=5)
    w = Worker(pool, run, FAST, name="dead", providers={"echo": gated})
    task = asyncio.create_task(w.run_until_stopped())
    assert await held_by(pool, "dead", 2 * BATCH) == 2 * BATCH
    held = {r.item.id for r in w.inflight}
    # Death, as far as the database can tell: nothing of the worker runs or writes again.
    for t in [task, *w.inflight.tasks()]:
        t.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await asyncio.sleep(5.5)  # the lease runs out
    async with pool.acquire() as db:
        res = await rescue.rescue_stuck(db, "run-1", 900)
    assert res.reset == 2 * BATCH
    survivor = Worker(pool, run, FAST, name="survivor", exit_when_done=True)
    stats = await asyncio.wait_for(survivor.run_until_stopped(), 60)
    assert stats.completed == 4 * BATCH
    async with pool.acquire() as db:
        rows = await db.fetch("SELECT q.id, q.lease_losses, r.attempt FROM analysis_queue q"
                              " JOIN analysis_results r ON r.queue_id = q.id")  # fmt: skip
    assert len(rows) == len({r["id"] for r in rows}) == 4 * BATCH  # each written once
    assert {r["id"] for r in rows if r["lease_losses"] == 1} == held
    assert {r["attempt"] for r in rows} == {1}  # the dead worker's claims spent no attempt


async def test_without_prefetch_a_worker_holds_one_batch(
    pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANALYSISQ_PREFETCH", "false")
    settings = Settings(database_url="unused", poll_seconds=0.05)
    run, gated = await start(pool, 4 * BATCH)
    w = Worker(pool, run, settings, name="w", exit_when_done=True, providers={"echo": gated})
    task = asyncio.create_task(w.run_until_stopped())
    assert await held_by(pool, "w", BATCH) == BATCH
    await asyncio.sleep(0.3)
    assert await holds(pool, "w") == BATCH
    gated.gate.set()
    stats = await asyncio.wait_for(task, 60)
    assert stats.completed == 4 * BATCH and gated.most == BATCH


async def test_a_worker_never_holds_more_than_two_batches(pool: asyncpg.Pool) -> None:
    """The claim loop and the flush's claim run at the same time (the flush of the first
    batch meets the claim of the prefetched one): neither may count on the other's places."""
    run, _ = await start(pool, 60 * BATCH)
    w = Worker(pool, run, FAST, name="w", exit_when_done=True)
    most = 0

    async def watch() -> None:
        nonlocal most
        while True:
            most = max(most, len(w.inflight))
            await asyncio.sleep(0)

    watcher = asyncio.create_task(watch())
    stats = await asyncio.wait_for(w.run_until_stopped(), 60)
    watcher.cancel()
    assert stats.completed == 60 * BATCH
    assert most == 2 * BATCH


async def test_the_heartbeat_keeps_prefetched_claims(pool: asyncpg.Pool) -> None:
    """Claims waiting in line longer than a lease are renewed like running ones: a rescue
    then takes none of them."""
    run, gated = await start(pool, 4 * BATCH, leaseSeconds=5)
    w = Worker(pool, run, FAST, name="w", exit_when_done=True, providers={"echo": gated})
    task = asyncio.create_task(w.run_until_stopped())
    assert await held_by(pool, "w", 2 * BATCH) == 2 * BATCH
    await asyncio.sleep(6)  # longer than the lease: only renewals keep the claims
    async with pool.acquire() as db:
        res = await rescue.rescue_stuck(db, "run-1", 900)
    assert res.reset == 0 and await holds(pool, "w") == 2 * BATCH
    gated.gate.set()
    stats = await asyncio.wait_for(task, 60)
    assert stats.completed == 4 * BATCH and stats.lost == 0


class Refusing(Gated):
    """Once ``gate`` is set, refuses our credentials (a 401) until ``refuse`` is cleared."""

    def __init__(self, target: Any) -> None:
        super().__init__(target)
        self.refuse = True

    async def complete(self, prompt: str) -> Completion:
        answer = await super().complete(prompt)
        if self.refuse:
            raise AuthError("HTTP 401: invalid api key")
        return answer


async def test_a_paused_target_sends_none_of_the_prefetched_claims(pool: asyncpg.Pool) -> None:
    """A 401 pauses the target: each worker sent only the attempts already running, its
    prefetched claims went back unspent and parked, and once the target is resumed the same
    workers claim it again and finish the run."""
    run, _ = await start(pool, 4 * BATCH)
    workers, providers, tasks = [], [], []
    for name in ("a", "b"):
        refusing = Refusing(run.spec.targets[0])
        w = Worker(pool, run, FAST, name=name, exit_when_done=True, providers={"echo": refusing})
        tasks.append(asyncio.create_task(w.run_until_stopped()))
        workers.append(w)
        providers.append(refusing)
        assert await held_by(pool, name, 2 * BATCH) == 2 * BATCH
    for p in providers:
        assert (p.running, p.sent) == (BATCH, BATCH)
        p.gate.set()
    for _ in range(200):  # until every claim went back
        if not await holds(pool, "a") and not await holds(pool, "b"):
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)  # and nothing more is sent or claimed
    assert [p.sent for p in providers] == [BATCH, BATCH]  # the attempts in flight, no more
    assert [w.stats.released for w in workers] == [BATCH, BATCH]
    async with pool.acquire() as db:
        rows = await db.fetch("SELECT status, attempts, next_attempt_at = 'infinity' AS parked,"
                              " count(*) AS n FROM analysis_queue GROUP BY 1, 2, 3")  # fmt: skip
        assert {tuple(r) for r in rows} == {("pending", 0, True, 4 * BATCH)}
        assert await runs.resume_targets(db, "run-1") == ["echo"]
    for p in providers:
        p.refuse = False
    stats = await asyncio.wait_for(asyncio.gather(*tasks), 60)
    assert sum(s.completed for s in stats) == 4 * BATCH
    async with pool.acquire() as db:
        assert await db.fetchval("SELECT max(attempt) FROM analysis_results") == 1
        assert await db.fetchval("SELECT count(DISTINCT queue_id) FROM analysis_results") == (
            4 * BATCH
        )


async def test_a_slow_rate_limited_pool_fills_no_prefetch(pool: asyncpg.Pool) -> None:
    """At 1 request/s the claim hands out a pool's items only with a slot within its 2 s
    horizon; a worker whose running slots are all taken (the provider holds the requests)
    must not keep claiming as those promises pass: it holds no claim it cannot start."""
    limited = [{"name": "echo", "provider": "echo", "model": "echo-1",
                "rateLimit": {"requestsPerSecond": 1}}]  # fmt: skip
    run, gated = await start(pool, 2 * BATCH + 2, targets=limited)
    w = Worker(pool, run, FAST, name="w", exit_when_done=True, providers={"echo": gated})
    waiting = 0

    async def watch() -> None:
        nonlocal waiting
        while True:
            waiting = max(waiting, len(w.inflight.waiting()))
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(watch())
    task = asyncio.create_task(w.run_until_stopped())
    for _ in range(400):  # every running slot taken, at 1 request/s
        if gated.running == BATCH:
            break
        await asyncio.sleep(0.05)
    assert gated.running == BATCH
    await asyncio.sleep(5)  # the horizon passes twice over: the pool would hand out more
    assert await holds(pool, "w") == BATCH and waiting == 0
    gated.gate.set()
    stats = await asyncio.wait_for(task, 60)
    watcher.cancel()
    assert stats.completed == gated.sent == 2 * BATCH + 2
    assert waiting == 0

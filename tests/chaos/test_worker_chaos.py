"""Chaos against real worker processes: kill -9, a database restart, a 429 storm.

After each, the invariants must hold: every item terminal, none stuck, none lost, one result
per item, and no attempt counted beyond the policy.
"""

from __future__ import annotations

import asyncio
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from workers import WorkerProcs

from analysisq.db.embedded import EmbeddedPostgres
from analysisq.db.migrate import migrate
from analysisq.fake_provider.config import FakeConfig
from analysisq.fake_provider.server import FakeProvider
from analysisq.queue import runs
from support import add_prompts, new_run, spec

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(240)]


@pytest.fixture
def procs_factory(tmp_path: Path) -> Iterator[list[WorkerProcs]]:
    made: list[WorkerProcs] = []
    yield made
    for p in made:
        p.close()


def fake_spec(url: str, **kw: object) -> object:
    return spec(targets=[{"name": "fake", "provider": "openai", "model": "m", "endpoint": url}],
                **kw)  # fmt: skip


async def invariants(conn: asyncpg.Connection, total: int) -> None:
    counts = await runs.counts(conn, "run-1")
    assert counts.total == total
    assert counts.done and counts.stuck == 0, counts
    results = await conn.fetchval("SELECT count(*) FROM analysis_results")
    distinct = await conn.fetchval("SELECT count(DISTINCT queue_id) FROM analysis_results")
    assert results == distinct == counts.completed == total


async def wait_for(conn: asyncpg.Connection, sql: str, predicate: object, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate(await conn.fetchval(sql)):  # type: ignore[operator]
            return time.monotonic() - start
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting on: {sql}")


async def test_kill_9_of_a_worker(
    db: asyncpg.Connection, db_url: str, tmp_path: Path, procs_factory: list[WorkerProcs]
) -> None:
    async with FakeProvider(FakeConfig(latency_ms=150, jitter_ms=50)) as fake:
        await add_prompts(db, 300)
        s = fake_spec(fake.url, leaseSeconds=5, batchSize=5)
        await new_run(db, s=s)  # type: ignore[arg-type]
        procs = WorkerProcs(db_url, "run-1", tmp_path)
        procs_factory.append(procs)
        victim, *_ = procs.start(3)
        await wait_for(db, "SELECT count(*) FROM analysis_queue WHERE status = 'completed'",
                       lambda n: n >= 60, 60)  # fmt: skip
        held = await db.fetch(
            "SELECT id FROM analysis_queue WHERE status = 'processing' AND lease_owner LIKE $1",
            f"%:{victim.pid}",
        )
        victim.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        assert held, "the victim held nothing when it was killed"
        ids = [r["id"] for r in held]
        recovery = await wait_for(
            db,
            f"SELECT count(*) FROM analysis_queue WHERE id IN ({','.join(map(str, ids))})"
            " AND status = 'processing' AND lease_owner LIKE '%:" + str(victim.pid) + "'",
            lambda n: n == 0,
            60,
        )
        codes = await asyncio.to_thread(procs.wait, 120)
        stats = fake.stats()
    assert codes[0] == -signal.SIGKILL and codes[1:] == [0, 0], procs.logs()
    await invariants(db, 300)
    # its items came back within about one lease (5 s) plus a rescue period
    assert recovery < 2 * 5 + 5, recovery
    assert time.monotonic() - killed_at < 120
    rows = await db.fetch(
        "SELECT q.lease_losses, r.attempt FROM analysis_queue q"
        " JOIN analysis_results r ON r.queue_id = q.id WHERE q.id = ANY($1)", ids
    )  # fmt: skip
    assert {tuple(r) for r in rows} == {(1, 1)}  # the lost attempt was not counted
    # answers that the victim received but never wrote are the only repeats
    assert stats.prompts_completed_more_than_once <= len(ids)


async def test_workers_survive_a_database_restart(
    tmp_path: Path, procs_factory: list[WorkerProcs]
) -> None:
    with tempfile.TemporaryDirectory(prefix="aq-restart-") as d:
        pg = EmbeddedPostgres(Path(d), fsync=False)
        url = pg.start()
        try:
            conn = await asyncpg.connect(url)
            await migrate(conn)
            async with FakeProvider(FakeConfig(latency_ms=50)) as fake:
                await add_prompts(conn, 400)
                await new_run(conn, s=fake_spec(fake.url, leaseSeconds=5))  # type: ignore[arg-type]
                procs = WorkerProcs(url, "run-1", tmp_path)
                procs_factory.append(procs)
                procs.start(3)
                await wait_for(conn, "SELECT count(*) FROM analysis_queue"
                               " WHERE status = 'completed'", lambda n: n >= 50, 60)  # fmt: skip
                await conn.close()
                await asyncio.to_thread(pg.stop, "immediate")  # a crash, not a clean stop
                await asyncio.sleep(3)
                await asyncio.to_thread(pg.start)
                codes = await asyncio.to_thread(procs.wait, 180)
                assert codes == [0, 0, 0], procs.logs()
                conn = await asyncpg.connect(url)
                await invariants(conn, 400)
                await conn.close()
        finally:
            pg.stop(mode="immediate")


async def test_a_429_storm_burns_no_attempts(
    db: asyncpg.Connection, db_url: str, tmp_path: Path, procs_factory: list[WorkerProcs]
) -> None:
    calm = FakeConfig(latency_ms=20)
    async with FakeProvider(calm) as fake:
        await add_prompts(db, 200)
        await new_run(db, s=fake_spec(fake.url))  # type: ignore[arg-type]
        procs = WorkerProcs(db_url, "run-1", tmp_path)
        procs_factory.append(procs)
        procs.start(2)
        await wait_for(db, "SELECT count(*) FROM analysis_queue WHERE status = 'completed'",
                       lambda n: n >= 20, 60)  # fmt: skip
        fake.configure(FakeConfig(errors={"429": 1.0}, retry_after_s=0.5))
        await asyncio.sleep(3)
        fake.configure(calm)
        codes = await asyncio.to_thread(procs.wait, 120)
        stats = fake.stats()
    assert codes == [0, 0], procs.logs()
    assert stats.by_status.get("429", 0) > 10
    await invariants(db, 200)
    assert await db.fetchval("SELECT max(attempt) FROM analysis_results") == 1
    assert await db.fetchval("SELECT sum(deferrals) FROM analysis_queue") > 0

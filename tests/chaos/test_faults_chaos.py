"""Lease losses charged only where a worker really lost its lease (issue 9, finding 2).

Real ``analysisq worker`` processes and a real PostgreSQL: a prompt that kills every worker
that takes it must poison itself alone, and a database outage of two leases (``pg_ctl stop``,
then ``start``) must charge no attempt and no lease loss to the items of workers that lived.
"""

from __future__ import annotations

import asyncio
import signal
import tempfile
import time
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

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(300)]

LEASE = 5


def fake_spec(url: str, **kw: object) -> object:
    target = {"name": "fake", "provider": "openai", "model": "m", "endpoint": url}
    return spec(targets=[target], leaseSeconds=LEASE, batchSize=5, **kw)


async def test_a_killer_prompt_among_100_poisons_only_itself(
    db: asyncpg.Connection, db_url: str, tmp_path: Path, procs_factory: list[WorkerProcs]
) -> None:
    """Whichever worker takes the killer prompt dies at once (SIGKILL, as an out-of-memory
    kill would). Its batch-mates come back with it, but no worker holds two items that lost a
    lease and only losses that point at an item count: the killer alone reaches
    maxLeaseLosses (3; a fourth kill when its first death was with batch-mates) and every
    other prompt completes."""
    async with FakeProvider(FakeConfig(latency_ms=800, jitter_ms=200)) as fake:
        ids = await add_prompts(db, 100)
        killer = ids[37]
        await new_run(db, s=fake_spec(fake.url))  # type: ignore[arg-type]
        procs = WorkerProcs(db_url, "run-1", tmp_path)
        procs_factory.append(procs)
        procs.start(3)
        by_pid = {p.pid: p for p in procs.procs}
        kills = 0
        deadline = time.monotonic() + 200
        while time.monotonic() < deadline and not (await runs.counts(db, "run-1")).done:
            owner = await db.fetchval(
                "SELECT q.lease_owner FROM analysis_queue q JOIN prompts p"
                " ON p.id = q.prompt_tracking_id WHERE p.external_id = $1"
                " AND q.status = 'processing'",
                killer,
            )
            victim = by_pid.get(int(owner.rsplit(":", 1)[1])) if owner else None
            if victim is not None and victim.poll() is None:
                victim.send_signal(signal.SIGKILL)
                victim.wait()
                kills += 1
                (replacement,) = procs.start(1)  # as the Deployment would
                by_pid[replacement.pid] = replacement
            await asyncio.sleep(0.02)
        await asyncio.to_thread(procs.wait, 120)
    rows = await db.fetch(
        "SELECT p.external_id, q.status, q.error_class, q.lease_losses FROM analysis_queue q"
        " JOIN prompts p ON p.id = q.prompt_tracking_id"
    )
    by_id = {r["external_id"]: r for r in rows}
    assert (by_id[killer]["status"], by_id[killer]["error_class"]) == ("failed", "poison")
    assert kills in (3, 4), procs.logs()
    innocent = [r for r in rows if r["external_id"] != killer]
    assert {r["status"] for r in innocent} == {"completed"}, [
        dict(r) for r in innocent if r["status"] != "completed"
    ]
    assert max(r["lease_losses"] for r in innocent) <= 1
    assert await db.fetchval("SELECT count(DISTINCT queue_id) FROM analysis_results") == 99


async def test_a_database_outage_of_two_leases_charges_nothing(
    tmp_path: Path, procs_factory: list[WorkerProcs]
) -> None:
    """``pg_ctl stop`` while every worker waits on the provider, two leases of nothing,
    ``pg_ctl start``: the workers keep their items, renew the leases once the server is back
    (before anyone takes them for a dead worker's), and no item loses a lease or an attempt."""
    with tempfile.TemporaryDirectory(prefix="aq-outage-") as d:
        pg = EmbeddedPostgres(Path(d), fsync=False)
        url = pg.start()
        try:
            conn = await asyncpg.connect(url)
            await migrate(conn)
            # Answers take longer than the outage: the first claims are still in the provider's
            # hands when the server is back, with leases that ran out while it was down.
            async with FakeProvider(FakeConfig(latency_ms=14_000, jitter_ms=1000)) as fake:
                await add_prompts(conn, 30)
                await new_run(conn, s=fake_spec(fake.url))  # type: ignore[arg-type]
                procs = WorkerProcs(url, "run-1", tmp_path)
                procs_factory.append(procs)
                procs.start(3)
                for _ in range(600):
                    if fake.stats().requests >= 15:
                        break
                    await asyncio.sleep(0.1)
                held = await conn.fetchval(
                    "SELECT count(*) FROM analysis_queue WHERE status = 'processing'"
                )
                await conn.close()
                await asyncio.to_thread(pg.stop, "fast")
                await asyncio.sleep(2 * LEASE)
                await asyncio.to_thread(pg.start)
                codes = await asyncio.to_thread(procs.wait, 180)
            assert held > 0 and codes == [0, 0, 0], procs.logs()
            conn = await asyncpg.connect(url)
            counts = await runs.counts(conn, "run-1")
            results = await conn.fetchval("SELECT count(DISTINCT queue_id) FROM analysis_results")
            charged = await conn.fetch(
                "SELECT id, attempts, lease_losses, error_message FROM analysis_queue"
                " WHERE lease_losses > 0 OR attempts <> 1"
            )
            await conn.close()
            assert (counts.completed, results) == (30, 30), counts
            assert charged == [], [dict(r) for r in charged]
        finally:
            pg.stop(mode="immediate")

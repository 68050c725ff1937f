"""Worker processes behind a real PgBouncer (transaction mode) that crashes mid-run.

The workers run ``analysisq worker`` with ``ANALYSISQ_DATABASE_POOLER=transaction`` through a
PgBouncer of their own (tests/pooler.py) whose server pool is smaller than their client
connections; a few seconds in, PgBouncer is killed (SIGKILL: every client and server
connection is cut at once) and started again on the same port. The invariants must hold
afterwards: every item terminal, none stuck, none lost, one result per item.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest
from test_worker_chaos import fake_spec, invariants, wait_for
from workers import WorkerProcs

from analysisq.fake_provider.config import FakeConfig
from analysisq.fake_provider.server import FakeProvider
from pooler import PgBouncer
from support import add_prompts, new_run

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(240)]


@pytest.fixture
def bouncer(pg_admin_url: str) -> Iterator[PgBouncer]:
    b = PgBouncer(pg_admin_url, pool_size=3)
    b.start()
    try:
        yield b
    finally:
        b.close()


async def test_workers_survive_a_pgbouncer_restart(
    db: asyncpg.Connection, db_url: str, tmp_path: Path, bouncer: PgBouncer
) -> None:
    url = bouncer.url(urlsplit(db_url).path.lstrip("/"))
    async with FakeProvider(FakeConfig(latency_ms=50)) as fake:
        await add_prompts(db, 400)
        await new_run(db, s=fake_spec(fake.url, leaseSeconds=5))  # type: ignore[arg-type]
        procs = WorkerProcs(url, "run-1", tmp_path, ANALYSISQ_DATABASE_POOLER="transaction")
        try:
            procs.start(3)
            await wait_for(db, "SELECT count(*) FROM analysis_queue WHERE status = 'completed'",
                           lambda n: n >= 50, 60)  # fmt: skip
            before = await db.fetchval(
                "SELECT count(*) FROM analysis_queue WHERE status = 'completed'"
            )
            await asyncio.to_thread(bouncer.restart, 2.0)
            restarted_at = time.monotonic()
            codes = await asyncio.to_thread(procs.wait, 180)
            assert codes == [0, 0, 0], procs.logs()
        finally:
            procs.close()
    assert before < 400, "the run ended before the pooler went down"
    assert time.monotonic() - restarted_at < 180
    await invariants(db, 400)

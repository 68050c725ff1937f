"""A database that stops answering: timeouts and keepalives instead of hangs.

A TCP proxy between the worker and a real PostgreSQL turns every open connection into a black
hole (what a failover or a lost NAT entry leaves behind: the socket open, no byte back). Without
``command_timeout`` and a pool-acquire timeout the worker's statements, its heartbeats among
them, would wait for ever; with them they fail, the dead connections are dropped, and the
work resumes on new connections.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest

from analysisq.db.connect import acquire, create_pool, translated
from analysisq.errors import DatabaseUnavailable
from analysisq.fake_provider.config import FakeConfig
from analysisq.fake_provider.server import FakeProvider
from analysisq.queue import runs
from analysisq.settings import Settings
from analysisq.worker import serve
from support import add_prompts, new_run, spec
from tcp_proxy import StallingProxy

pytestmark = [pytest.mark.db, pytest.mark.timeout(180)]

#: Longer than any bound under test: reaching it means the call hung.
HUNG = 60.0


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/", 1)[0])


async def test_statements_and_acquires_fail_instead_of_hanging(db_url: str) -> None:
    async with StallingProxy("127.0.0.1", _port(db_url)) as proxy:
        pool = await create_pool(proxy.url(db_url), min_size=2, max_size=2, command_timeout=1)
        try:
            assert await pool.fetchval("SELECT 1") == 1
            proxy.stall()
            with pytest.raises(DatabaseUnavailable):
                async with acquire(pool) as conn:
                    with translated("a statement"):
                        await asyncio.wait_for(conn.fetchval("SELECT 2"), HUNG)
            # new connections are black holes too: the acquire gives up instead of waiting
            with pytest.raises(DatabaseUnavailable):
                async with acquire(pool, timeout=2) as conn:
                    with translated("a statement"):
                        await asyncio.wait_for(conn.fetchval("SELECT 3"), HUNG)
            proxy.resume()
            # the dead connections were dropped: new ones through the new path work
            for _ in range(3):
                async with acquire(pool) as conn:
                    assert await asyncio.wait_for(conn.fetchval("SELECT 4"), HUNG) == 4
        finally:
            pool.terminate()


def _keepalive_ports() -> set[int]:
    """Local ports of this machine's TCP sockets whose keepalive timer runs (/proc/net/tcp
    column ``tr`` = 2), as the kernel reports them."""
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        path = Path(table)
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            local, timer = fields[1], fields[5]
            if timer.split(":")[0] == "02":
                ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports


async def test_connections_keep_alive(db_url: str, pg_admin_url: str) -> None:
    # Straight to PostgreSQL: behind a pooler the server sees the pooler's own connections.
    db_url = f"{pg_admin_url.rpartition('/')[0]}/{db_url.rpartition('/')[2]}"
    pool = await create_pool(db_url, min_size=2, max_size=2)
    try:
        async with acquire(pool) as conn:
            port = await conn.fetchval("SELECT inet_client_port()")
        assert port in _keepalive_ports()
    finally:
        await pool.close()
    plain = await asyncpg.connect(db_url)
    try:
        assert await plain.fetchval("SELECT inet_client_port()") not in _keepalive_ports()
    finally:
        await plain.close()


async def test_a_worker_recovers_from_half_open_connections(db_url: str) -> None:
    """Mid-run every connection of the worker becomes a black hole: its heartbeats and writes
    time out, it reconnects through the new path, and the run completes, each item once."""
    async with (
        FakeProvider(FakeConfig(latency_ms=200)) as fake,
        StallingProxy("127.0.0.1", _port(db_url)) as proxy,
    ):
        target = {"name": "fake", "provider": "openai", "model": "m", "endpoint": fake.url}
        conn = await asyncpg.connect(db_url)
        try:
            await add_prompts(conn, 40)
            await new_run(conn, s=spec(targets=[target], leaseSeconds=30, batchSize=4))
        finally:
            await conn.close()
        settings = Settings(
            database_url="unused", poll_seconds=0.05, database_command_timeout_seconds=2
        )
        # the worker process's own start-up: its pool gets the timeouts from the settings
        task = asyncio.create_task(serve(settings, proxy.url(db_url), "run-1", exit_when_done=True))
        for _ in range(1200):
            if fake.stats().requests >= 8:
                break
            await asyncio.sleep(0.05)
        proxy.stall()
        await asyncio.sleep(5)
        proxy.resume()
        assert await asyncio.wait_for(task, 120) == 0
    conn = await asyncpg.connect(db_url)
    try:
        counts = await runs.counts(conn, "run-1")
        results = await conn.fetchval("SELECT count(DISTINCT queue_id) FROM analysis_results")
        losses = await conn.fetchval("SELECT sum(lease_losses) FROM analysis_queue")
    finally:
        await conn.close()
    assert (counts.completed, results, losses) == (40, 40, 0), counts

"""analysisq behind a real PgBouncer in transaction mode (tests/pooler.py).

Each test starts its own PgBouncer with a server pool far smaller than the number of client
connections, in front of the test database's server, so that consecutive transactions of one
client land on different server connections and several clients share one: what breaks a
client that keeps session state (named prepared statements, session advisory locks, SETs).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import asyncpg
import pytest
from click.testing import CliRunner

from analysisq.cli.main import cli
from analysisq.db.connect import connect, create_pool
from analysisq.db.migrate import check_schema, known_migrations, migrate, schema_version
from analysisq.queue import runs
from analysisq.settings import Settings
from analysisq.worker import Worker
from pooler import PgBouncer
from support import add_prompts, new_run, spec

pytestmark = [pytest.mark.db, pytest.mark.timeout(180)]

#: Server connections the pooler may open per database: 20 workers x 4 share 3.
SERVER_POOL = 3


@pytest.fixture
async def bouncer(pg_admin_url: str) -> AsyncIterator[PgBouncer]:
    b = PgBouncer(pg_admin_url, pool_size=SERVER_POOL)
    await asyncio.to_thread(b.start)
    try:
        yield b
    finally:
        b.close()


def db_name(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


async def test_many_clients_share_a_small_server_pool(
    bouncer: PgBouncer, db_url: str, db: asyncpg.Connection
) -> None:
    """Clients outnumbering server connections run parameterised statements side by side.

    With asyncpg's statement cache (``pooler="none"``) the second client to prepare on a
    shared server connection meets the first one's ``__asyncpg_stmt_1__``.
    """
    url = bouncer.url(db_name(db_url))
    await add_prompts(db, 5)
    conns = [await connect(url, pooler="transaction") for _ in range(4 * SERVER_POOL)]
    try:
        for _ in range(3):
            got = await asyncio.gather(
                *(c.fetchval("SELECT count(*) FROM prompts WHERE id > $1", 0) for c in conns)
            )
            assert got == [5] * len(conns)
        zones = {await c.fetchval("SELECT current_setting('TimeZone')") for c in conns}
        assert zones == {"UTC"}  # the startup parameter holds on every server connection
    finally:
        for c in conns:
            await c.close()


async def test_twenty_workers_drain_through_three_server_connections(
    bouncer: PgBouncer, db_url: str, db: asyncpg.Connection
) -> None:
    url = bouncer.url(db_name(db_url))
    await add_prompts(db, 400)
    await new_run(db, s=spec(batchSize=5))
    settings = Settings(database_url=url, database_pooler="transaction", poll_seconds=0.05)
    pools = [
        await create_pool(url, pooler="transaction", min_size=1, max_size=4) for _ in range(20)
    ]
    try:
        async with pools[0].acquire() as conn:
            run = await runs.get_run(conn, "run-1")
        workers = [
            Worker(p, run, settings, name=f"w{i}", exit_when_done=True) for i, p in enumerate(pools)
        ]
        stats = await asyncio.gather(*(w.run_until_stopped() for w in workers))
        backends = await db.fetchval(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = 'analysisq'"
            " AND pid <> pg_backend_pid()"  # this test's own connection is analysisq's too
        )
    finally:
        for p in pools:
            await p.close()
    assert sum(s.completed for s in stats) == 400
    assert sum(s.lost for s in stats) == 0
    assert backends <= SERVER_POOL
    counts = await runs.counts(db, "run-1")
    assert counts.completed == 400 and counts.done
    assert await db.fetchval("SELECT count(DISTINCT queue_id) FROM analysis_results") == 400


async def test_concurrent_migrations_through_the_pooler_apply_each_once(
    bouncer: PgBouncer, pg_admin_url: str
) -> None:
    """The migration lock is transaction-scoped: no session lock to strand on a server
    connection the pooler gives to someone else."""
    admin = await asyncpg.connect(pg_admin_url)
    try:
        await admin.execute('CREATE DATABASE "aq_pooler_migrate"')
        url = bouncer.url("aq_pooler_migrate")
        conns = [await connect(url, pooler="transaction") for _ in range(4)]
        try:
            applied = await asyncio.gather(*(migrate(c) for c in conns))
            # each file applied by exactly one of them (they may share the work)
            versions = sorted(m.version for a in applied for m in a)
            assert versions == [m.version for m in known_migrations()]
            assert await check_schema(conns[0]) == schema_version()
            held = await conns[0].fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
            )
            assert held == 0
        finally:
            for c in conns:
                await c.close()
    finally:
        await admin.execute('DROP DATABASE IF EXISTS "aq_pooler_migrate" WITH (FORCE)')
        await admin.close()


async def test_cli_through_the_pooler(
    bouncer: PgBouncer, db_url: str, db: asyncpg.Connection
) -> None:
    url = bouncer.url(db_name(db_url))
    await add_prompts(db, 3)
    await new_run(db)

    def invoke(*args: str) -> str:
        result = CliRunner().invoke(
            cli, ["--database-url", url, "--database-pooler", "transaction", *args]
        )
        assert result.exit_code == 0, result.output
        return result.output

    assert "up to date" in await asyncio.to_thread(invoke, "migrate")
    assert '"total": 3' in await asyncio.to_thread(invoke, "status", "run-1", "--json")

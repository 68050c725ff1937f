"""Start-up of a worker process: signals, wait for the database, refuse a stale schema, serve.

``serve`` is what ``analysisq worker`` runs: SIGTERM and SIGINT stop the worker gracefully
(before the pool exists they end the wait for the database), a database that is down at start
is waited for with backoff instead of crashed on, and a schema this code does not know is
refused before any item is claimed.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncpg

from analysisq.db.connect import acquire, create_pool
from analysisq.db.migrate import check_schema
from analysisq.errors import DatabaseTransient
from analysisq.queue.runs import Run, get_run
from analysisq.settings import Settings
from analysisq.worker.loops import Worker

log = logging.getLogger("analysisq.worker")

_SIGNALS = (signal.SIGTERM, signal.SIGINT)
T = TypeVar("T")


async def _through_outages(stop: asyncio.Event, step: Callable[[], Awaitable[T]]) -> T | None:
    """``step()`` once the database answers it, retried with backoff through an outage;
    None if told to stop first. A refusal (no such run, an old schema) is raised."""
    delay = 1.0
    while True:
        try:
            return await step()
        except DatabaseTransient as exc:
            log.warning("worker not started yet; retrying", extra={"error": exc.message})
            try:
                await asyncio.wait_for(stop.wait(), timeout=delay)
                return None
            except TimeoutError:
                delay = min(delay * 2, 30.0)


async def _new_pool(settings: Settings, url: str) -> asyncpg.Pool:
    return await create_pool(
        url,
        pooler=settings.database_pooler,
        min_size=1,
        max_size=settings.pool_size,
        command_timeout=settings.database_command_timeout_seconds,
    )


async def _read_run(pool: asyncpg.Pool, run_id: str) -> Run:
    async with acquire(pool) as conn:
        await check_schema(conn)
        return await get_run(conn, run_id)


async def serve(settings: Settings, url: str, run_id: str, *, exit_when_done: bool) -> int:
    """Serve run *run_id* until SIGTERM (or until it is done); the process exit code."""
    stop = asyncio.Event()
    worker: Worker | None = None

    def on_signal() -> None:
        stop.set()
        if worker is not None:
            worker.stop()

    loop = asyncio.get_running_loop()
    for sig in _SIGNALS:
        loop.add_signal_handler(sig, on_signal)
    try:
        pool = await _through_outages(stop, lambda: _new_pool(settings, url))
        if pool is None:
            return 0
        try:
            # A restart right after the pool connected is an outage too, not a crash.
            run = await _through_outages(stop, lambda: _read_run(pool, run_id))
            if run is None:
                return 0
            worker = Worker(pool, run, settings, exit_when_done=exit_when_done)
            if stop.is_set():
                worker.stop()
            await worker.run_until_stopped()
            return 0
        finally:
            await pool.close()
    finally:
        for sig in _SIGNALS:
            loop.remove_signal_handler(sig)

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

import asyncpg

from analysisq.db.connect import acquire, create_pool
from analysisq.db.migrate import check_schema
from analysisq.errors import DatabaseUnavailable
from analysisq.queue.runs import get_run
from analysisq.settings import Settings
from analysisq.worker.loops import Worker

log = logging.getLogger("analysisq.worker")

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


async def _wait_for_pool(settings: Settings, url: str, stop: asyncio.Event) -> asyncpg.Pool | None:
    """A pool once the database answers; None if told to stop first."""
    delay = 1.0
    while True:
        try:
            return await create_pool(
                url,
                pooler=settings.database_pooler,
                min_size=1,
                max_size=settings.pool_size,
                command_timeout=settings.database_command_timeout_seconds,
            )
        except DatabaseUnavailable as exc:
            log.warning("database unavailable; retrying", extra={"error": exc.message})
            try:
                await asyncio.wait_for(stop.wait(), timeout=delay)
                return None
            except TimeoutError:
                delay = min(delay * 2, 30.0)


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
        pool = await _wait_for_pool(settings, url, stop)
        if pool is None:
            return 0
        try:
            async with acquire(pool) as conn:
                await check_schema(conn)
                run = await get_run(conn, run_id)
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

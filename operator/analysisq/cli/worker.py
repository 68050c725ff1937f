"""``analysisq worker --run RUN``: the process every worker pod and local worker runs."""

from __future__ import annotations

import asyncio
import logging
import signal

import click

from analysisq.cli.common import run_async
from analysisq.cli.main import Context
from analysisq.db.connect import acquire, create_pool
from analysisq.db.migrate import check_schema
from analysisq.errors import DatabaseUnavailable
from analysisq.queue.runs import get_run
from analysisq.settings import Settings
from analysisq.worker.loop import Worker

log = logging.getLogger("analysisq.worker")


async def _serve(settings: Settings, url: str, run_id: str, exit_when_done: bool) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    delay = 1.0
    while True:  # a database that is down at start is waited for, not crashed on
        try:
            pool = await create_pool(url, min_size=1, max_size=settings.pool_size)
            break
        except DatabaseUnavailable as exc:
            log.warning("database unavailable; retrying", extra={"error": exc.message})
            try:
                await asyncio.wait_for(stop.wait(), timeout=delay)
                return 0
            except TimeoutError:
                delay = min(delay * 2, 30.0)
    try:
        async with acquire(pool) as conn:
            await check_schema(conn)
            run = await get_run(conn, run_id)
        worker = Worker(pool, run, settings, exit_when_done=exit_when_done)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.stop)
        if stop.is_set():
            worker.stop()
        await worker.run_until_stopped()
        return 0
    finally:
        await pool.close()


@click.command()
@click.option("--run", "run_id", required=True, envvar="ANALYSISQ_RUN", help="Run id or name.")
@click.option("--exit-when-done", is_flag=True, help="Exit once every item is terminal.")
@click.pass_obj
def worker(obj: Context, run_id: str, exit_when_done: bool) -> None:
    """Drain one run's queue until SIGTERM (or until done with --exit-when-done)."""
    settings = obj.settings
    if not settings.database_url:
        raise click.UsageError("the worker needs DATABASE_URL (or --database-url)")
    raise SystemExit(run_async(_serve(settings, settings.database_url, run_id, exit_when_done)))


COMMANDS = [worker]

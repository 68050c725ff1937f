"""``analysisq worker --run RUN``: the process every worker pod and local worker runs."""

from __future__ import annotations

import asyncio

import click

from analysisq.cli.main import Context
from analysisq.worker import serve


@click.command()
@click.option("--run", "run_id", required=True, envvar="ANALYSISQ_RUN", help="Run id or name.")
@click.option("--exit-when-done", is_flag=True, help="Exit once every item is terminal.")
@click.pass_obj
def worker(obj: Context, run_id: str, exit_when_done: bool) -> None:
    """Drain one run's queue until SIGTERM (or until done with --exit-when-done)."""
    settings = obj.settings
    if not settings.database_url:
        raise click.UsageError("the worker needs DATABASE_URL (or --database-url)")
    work = serve(settings, settings.database_url, run_id, exit_when_done=exit_when_done)
    raise SystemExit(asyncio.run(work))


COMMANDS = [worker]

"""``analysisq prune --older-than 30d``: retention for finished runs (analysisq.queue.prune).

Removes the queue rows of runs finished longer ago than the horizon, and with ``--results``
their results too, after writing them to ``--export DIR`` (``DIR/RUN.jsonl``) when given.
Safe next to running workers: bounded batches that skip locked rows. docs/retention.md.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import click

from analysisq.cli.common import database_url, session
from analysisq.cli.main import Context
from analysisq.cli.output import console, json_option, print_json, quiet_logs
from analysisq.db.connect import acquire
from analysisq.errors import ConfigError
from analysisq.local.export import export_results
from analysisq.queue.prune import DEFAULT_BATCH, PruneReport
from analysisq.queue.prune import prune as prune_runs
from analysisq.settings import parse_duration


@click.command()
@click.option(
    "--older-than",
    "older_than",
    required=True,
    help="Prune runs finished longer ago than this (e.g. 30d, 12h).",
)
@click.option(
    "--results",
    "with_results",
    is_flag=True,
    help="Delete the runs' results too (default: keep them).",
)
@click.option(
    "--export",
    "export_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="With --results: first write each run's results to DIR/RUN.jsonl.",
)
@click.option(
    "--batch-size",
    default=DEFAULT_BATCH,
    show_default=True,
    type=click.IntRange(1, 1_000_000),
    help="Rows per delete statement.",
)
@json_option
@click.pass_obj
def prune(
    obj: Context,
    older_than: str,
    with_results: bool,
    export_dir: Path | None,
    batch_size: int,
    as_json: bool,
) -> None:
    """Remove finished runs' queue rows (and with --results their results) past a horizon."""
    if export_dir is not None and not with_results:
        raise ConfigError("--export writes the results that --results deletes: add --results")
    horizon = parse_duration(older_than).total_seconds()
    settings = obj.settings
    quiet_logs(settings)
    url = database_url(settings)

    async def export(conn: asyncpg.Connection, run_id: str) -> int:
        assert export_dir is not None
        return await export_results(conn, run_id, export_dir / f"{run_id}.jsonl")

    async def go() -> PruneReport:
        async with session(settings, url) as pool, acquire(pool) as conn:
            return await prune_runs(
                conn,
                horizon,
                results=with_results,
                export=export if export_dir is not None else None,
                batch=batch_size,
            )

    report = asyncio.run(go())
    if as_json:
        print_json(report)
        return
    console().print(
        f"pruned {len(report.runs)} run(s): {report.queue_rows:,} queue rows,"
        f" {report.results:,} results deleted, {report.exported:,} exported"
    )
    if report.incomplete:
        console().print(f"still holding open or locked items: {', '.join(report.incomplete)}")


COMMANDS = [prune]

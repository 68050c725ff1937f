"""The runbook's repairs: what a person runs after fixing a cause, one command each.

``cleanup`` (the seed's SQL function, now: stuck items rescued), ``targets`` (a run's
targets; ``targets resume`` un-pauses them after fixing a key) and ``retry`` (failed items
back in the queue). The reads are ``cli.runbook``; docs/runbook.md maps each to the seed.
"""

from __future__ import annotations

from typing import Any

import asyncpg
import click

from analysisq.cli.main import Context
from analysisq.cli.output import console, json_option, print_json, table
from analysisq.cli.runbook import RUN, run_id_of, scope, with_db
from analysisq.errors import ErrorClass
from analysisq.queue import rescue, retries, runs


@click.command()
@RUN
@click.option(
    "--stuck-after",
    default=900.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Also reset items not updated for this long (seed: 15 minutes).",
)
@json_option
@click.pass_obj
def cleanup(obj: Context, run: str | None, stuck_after: float, as_json: bool) -> None:
    """Reset stuck items now: SELECT * FROM cleanup_stuck_queue_items()."""

    async def work(conn: asyncpg.Connection) -> dict[str, Any]:
        run_id = await run_id_of(conn, run)
        res = await rescue.rescue_stuck(conn, run_id, stuck_after)
        return {"run": run_id, "reset_count": res.reset, "poisoned_count": res.poisoned}

    data = with_db(obj, work)
    if as_json:
        print_json(data)
        return
    rows = [(data["reset_count"], data["poisoned_count"])]
    columns = ["reset_count", "poisoned_count"]
    console().print(table(f"cleanup_stuck_queue_items(), {scope(data['run'])}", columns, rows))


class _ListByDefault(click.Group):
    """``targets RUN`` means ``targets list RUN``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["list", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_ListByDefault)
def targets() -> None:
    """A run's targets: rate limits and pauses (`targets RUN`, `targets resume RUN`)."""


@targets.command("list")
@click.argument("run")
@json_option
@click.pass_obj
def targets_list(obj: Context, run: str, as_json: bool) -> None:
    """RUN's targets, their rate limits and pools, and whether an auth failure paused them."""

    async def work(conn: asyncpg.Connection) -> dict[str, Any]:
        run_id = (await runs.get_run(conn, run)).id
        return {"run": run_id, "targets": await runs.targets(conn, run_id)}

    data = with_db(obj, work)
    if as_json:
        print_json(data)
        return
    columns = ["target", "req/s", "tokens/min", "pool", "paused since", "reason"]
    rows = [
        (t.target, t.requests_per_second, t.tokens_per_minute, t.pool, t.paused_at, t.pause_reason)
        for t in data["targets"]
    ]
    console().print(table(f"Targets of run {data['run']}", columns, rows, wrap=["reason"]))


@targets.command("resume")
@click.argument("run")
@click.argument("target", required=False)
@json_option
@click.pass_obj
def targets_resume(obj: Context, run: str, target: str | None, as_json: bool) -> None:
    """Un-pause TARGET (or every paused target) of RUN after fixing its credentials."""

    async def work(conn: asyncpg.Connection) -> dict[str, Any]:
        run_id = (await runs.get_run(conn, run)).id
        return {"run": run_id, "resumed": await runs.resume_targets(conn, run_id, target)}

    data = with_db(obj, work)
    if as_json:
        print_json(data)
    elif data["resumed"]:
        click.echo(f"resumed {', '.join(data['resumed'])}; the run's workers take them up again")
    else:
        click.echo("no paused target to resume")


@click.command()
@click.argument("run")
@click.option(
    "--class",
    "error_class",
    type=click.Choice([c.value for c in ErrorClass]),
    help="Only items that failed with this error class.",
)
@click.option("--target", help="Only items of this target.")
@click.option("--error", "error_text", metavar="TEXT", help="Only items whose error contains TEXT.")
@json_option
@click.pass_obj
def retry(
    obj: Context,
    run: str,
    error_class: str | None,
    target: str | None,
    error_text: str | None,
    as_json: bool,
) -> None:
    """Put RUN's failed-for-good items back in the queue, after fixing their cause.

    Attempts start again; the error that failed each item stays in its last_error. Filters
    combine. In a cluster, annotate the AnalysisRun instead (docs/operator.md)."""

    async def work(conn: asyncpg.Connection) -> dict[str, Any]:
        found = await runs.get_run(conn, run)
        if target is not None:
            found.spec.target(target)  # an unknown target is an error, not "0 items"
        count = await retries.retry_failed(
            conn, found.id, error_class=error_class, target=target, error=error_text
        )
        return {"run": found.id, "retried": count}

    data = with_db(obj, work)
    if as_json:
        print_json(data)
    elif data["retried"]:
        click.echo(
            f"put {data['retried']} failed items of run {data['run']} back in the queue; "
            f"`analysisq run --resume {data['run']}` works them (in a cluster the run's "
            "workers take them up)"
        )
    else:
        click.echo(f"no failed-for-good item of run {data['run']} matches")


COMMANDS = [cleanup, targets, retry]

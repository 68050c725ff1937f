"""The runbook's reads: the seed's monitoring, one command each.

``status`` (its first query: count and percentage per status, plus our retrying/stuck split),
``stuck``, ``failed``, ``errors`` (grouped by class and message), then ``runs`` and
``results``. What changes the queue (``cleanup``, ``targets``, ``retry``) is
``cli.repair``. Tables for people, ``--json`` for scripts. docs/runbook.md maps each to the
seed's SQL.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import click

from analysisq.cli.common import database_url, session
from analysisq.cli.main import Context
from analysisq.cli.output import (
    console,
    json_option,
    print_json,
    quiet_logs,
    results_options,
    table,
)
from analysisq.db.connect import acquire
from analysisq.local.export import export_results, result_format, write_results
from analysisq.local.usage_text import usage_json, usage_lines
from analysisq.queue import batches, budget, monitor, runs, usage
from analysisq.queue.usage import format_cost

T = TypeVar("T")
#: The optional RUN argument: a run id or name; without it, every run.
RUN = click.argument("run", required=False)


def with_db(obj: Context, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
    """*work* on one connection to the configured (or embedded) database; its result."""
    settings = obj.settings
    quiet_logs(settings)
    url = database_url(settings)

    async def go() -> T:
        async with session(settings, url) as pool, acquire(pool) as conn:
            return await work(conn)

    return asyncio.run(go())


async def run_id_of(conn: asyncpg.Connection, run: str | None) -> str | None:
    """The id of RUN (an id, or the newest run with that name); None for every run."""
    return None if run is None else (await runs.get_run(conn, run)).id


def scope(run_id: str | None) -> str:
    """How a table title names what it covers."""
    return f"run {run_id}" if run_id else "all runs"


@click.command()
@RUN
@json_option
@click.pass_obj
def status(obj: Context, run: str | None, as_json: bool) -> None:
    """Items per status with percentages (the seed's first query), for RUN or all runs."""

    async def work(conn: asyncpg.Connection) -> dict[str, Any]:
        run_id = await run_id_of(conn, run)
        out: dict[str, Any] = {
            "run": run_id,
            "statuses": [
                {"status": r["status"], "count": r["cantidad"], "percent": r["porcentaje"]}
                for r in await monitor.status_breakdown(conn, run_id)
            ],
        }
        if run_id is not None:
            out["counts"] = (await runs.counts(conn, run_id)).as_dict()
            out["items_per_second"] = round(await monitor.throughput(conn, run_id), 2)
            out["paused_targets"] = {
                t.target: t.pause_reason for t in await runs.targets(conn, run_id) if t.paused_at
            }
            out["usage"] = usage_json(await usage.run_usage(conn, run_id))
            state = await budget.state(conn, run_id)
            out["budget"] = None if state is None else {**vars(state), "exhausted": state.exhausted}
            summary = await batches.summary(conn, run_id)
            if summary.open_batches or summary.answered_by_batch:
                out["batches"] = {
                    "items_in_batches": summary.in_batches,
                    "answered_by_batch": summary.answered_by_batch,
                    "answered": summary.answered,
                    "open": [
                        {
                            "submission": b.id,
                            "target": b.target,
                            "provider_batch_id": b.provider_batch_id,
                            "status": b.provider_status or b.state,
                            "items": b.item_count,
                            "request_counts": dict(b.request_counts),
                            "created_at": b.created_at.isoformat(),
                        }
                        for b in await batches.open_batches(conn, run_id)
                    ],
                }
        return out

    data = with_db(obj, work)
    if as_json:
        print_json(data)
        return
    out = console()
    rows = [(s["status"], s["count"], f"{s['percent']}%") for s in data["statuses"]]
    out.print(table(f"Queue, {scope(data['run'])}", ["status", "count", "percent"], rows))
    if "counts" in data:
        c = data["counts"]
        out.print(
            f"total {c['total']:,}: failed {c['failed']:,} for good, {c['retrying']:,} "
            f"retrying; {c['stuck']:,} stuck (lease expired); "
            f"{data['items_per_second']} items/s over the last minute",
            soft_wrap=True,
        )
        for target, reason in data["paused_targets"].items():
            out.print(f"target {target} PAUSED: {reason}")
        for line in usage_lines(data["usage"], data["budget"]):
            out.print(line, soft_wrap=True)
    if "batches" in data:
        b = data["batches"]
        out.print(
            f"{b['items_in_batches']:,} items waiting in {len(b['open'])} open provider "
            f"batches; {b['answered_by_batch']:,} of {b['answered']:,} answers came through a "
            "batch",
            soft_wrap=True,
        )
        listed = [
            (
                o["submission"],
                o["target"],
                o["provider_batch_id"] or "-",
                o["status"],
                o["items"],
                o["created_at"],
            )
            for o in b["open"]
        ]
        if listed:
            columns = ["submission", "target", "provider batch", "status", "items", "created"]
            out.print(table("Open provider batches", columns, listed))


@click.command()
@RUN
@click.option(
    "--older-than",
    default=600.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Seconds without an update (the seed used 10 minutes).",
)
@json_option
@click.pass_obj
def stuck(obj: Context, run: str | None, older_than: float, as_json: bool) -> None:
    """Items stuck in processing: not updated for --older-than seconds, or lease expired."""

    async def work(conn: asyncpg.Connection) -> dict[str, Any]:
        run_id = await run_id_of(conn, run)
        row = await monitor.stuck_items(conn, run_id, older_than)
        return {
            "run": run_id,
            "older_than_seconds": older_than,
            "stuck_items": row["stuck_items"],
            "oldest_updated_at": row["mas_antiguo"],
            "lease_expired": row["lease_expired"],
        }

    data = with_db(obj, work)
    if as_json:
        print_json(data)
        return
    rows = [(data["stuck_items"], data["lease_expired"], data["oldest_updated_at"])]
    columns = ["stuck items", "lease expired", "oldest update"]
    console().print(table(f"Stuck items, {scope(data['run'])}", columns, rows))
    if data["stuck_items"]:
        console().print("Reset them now with `analysisq cleanup`.")


@click.command()
@RUN
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 100_000))
@json_option
@click.pass_obj
def failed(obj: Context, run: str | None, limit: int, as_json: bool) -> None:
    """The newest failed items (retrying or failed for good), with their errors."""

    async def work(conn: asyncpg.Connection) -> dict[str, Any]:
        run_id = await run_id_of(conn, run)
        return {"run": run_id, "items": await monitor.failed_items(conn, run_id, limit)}

    data = with_db(obj, work)
    if as_json:
        print_json(data)
        return
    columns = ["id", "prompt", "target", "attempts", "class", "error", "updated", "retry"]
    rows = [
        (
            i["id"],
            i["external_id"],
            i["target"],
            i["attempts"],
            i["error_class"],
            i["error_message"],
            i["updated_at"],
            i["will_retry"],
        )
        for i in data["items"]
    ]
    console().print(table(f"Failed items, {scope(data['run'])}", columns, rows, wrap=["error"]))


@click.command()
@RUN
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 100_000))
@json_option
@click.pass_obj
def errors(obj: Context, run: str | None, limit: int, as_json: bool) -> None:
    """Failed items grouped by error class and message, most frequent first."""

    async def work(conn: asyncpg.Connection) -> dict[str, Any]:
        run_id = await run_id_of(conn, run)
        out: dict[str, Any] = {
            "run": run_id,
            "errors": await monitor.error_summary(conn, run_id, limit),
        }
        if run_id is not None:
            out["classes"] = await monitor.error_classes(conn, run_id)
        return out

    data = with_db(obj, work)
    if as_json:
        print_json(data)
        return
    rows = [(e["count"], e["error_class"], e["error_message"]) for e in data["errors"]]
    columns = ["count", "class", "message"]
    console().print(table(f"Errors, {scope(data['run'])}", columns, rows, wrap=["message"]))
    if data.get("classes"):
        classes = ", ".join(f"{k} {v:,}" for k, v in data["classes"].items())
        console().print(f"last error of every item, by class (retrying included): {classes}")


@click.command("runs")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 10_000))
@json_option
@click.pass_obj
def runs_command(obj: Context, limit: int, as_json: bool) -> None:
    """The newest runs with their progress, tokens and cost."""

    async def work(conn: asyncpg.Connection) -> list[dict[str, Any]]:
        out = []
        for r in await runs.list_runs(conn, limit):
            used = await usage.run_usage(conn, r["id"])
            out.append(
                {
                    **dict(r),
                    "counts": (await runs.counts(conn, r["id"])).as_dict(),
                    "tokens": used.tokens_in + used.tokens_out,
                    "cost": used.cost,
                }
            )
        return out

    data = with_db(obj, work)
    if as_json:
        print_json({"runs": data})
        return
    columns = [
        "run",
        "created",
        "total",
        "completed",
        "failed",
        "left",
        "tokens",
        "cost",
        "finished",
    ]
    rows = [
        (
            r["id"],
            r["created_at"],
            r["counts"]["total"],
            r["counts"]["completed"],
            r["counts"]["failed"],
            r["counts"]["total"] - r["counts"]["completed"] - r["counts"]["failed"],
            r["tokens"],
            format_cost(r["cost"]),
            r["finished_at"],
        )
        for r in data
    ]
    console().print(table("Runs", columns, rows))


@click.command()
@click.argument("run")
@results_options("standard output")
@click.pass_obj
def results(obj: Context, run: str, output: Path | None, output_format: str | None) -> None:
    """Write RUN's results (one row per completed item) as JSONL or CSV."""

    async def work(conn: asyncpg.Connection) -> int:
        run_id = (await runs.get_run(conn, run)).id
        if output is None:
            return await write_results(conn, run_id, sys.stdout, result_format(None, output_format))
        return await export_results(conn, run_id, output, output_format)

    written = with_db(obj, work)
    if output is not None:
        click.echo(f"{output}: {written:,} results", err=True)


COMMANDS = [status, stuck, failed, errors, runs_command, results]

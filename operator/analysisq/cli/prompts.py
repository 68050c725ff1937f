"""``analysisq prompts import FILE``: validate a CSV or JSONL file and upsert its prompts.

Every rejected row is reported with its line number and reason; every valid row is stored.
The exit code is 2 when any row was rejected, so a daily import job notices.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import click

from analysisq.cli.common import database_url, session
from analysisq.cli.main import Context
from analysisq.cli.output import console, json_option, print_json, quiet_logs
from analysisq.db.connect import acquire
from analysisq.errors import InputError
from analysisq.local.prompt_import import ImportReport, import_prompts


@click.group()
def prompts() -> None:
    """The stored prompts that runs analyse."""


@prompts.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["csv", "jsonl"]),
    help="File format (default: from the extension).",
)
@click.option(
    "--max-prompt-chars", type=click.IntRange(min=1), help="Longest text accepted (100,000)."
)
@click.option("--import-batch-size", type=click.IntRange(min=1), help="Rows per statement (1,000).")
@click.option("--dry-run", is_flag=True, help="Validate only; store nothing.")
@json_option
@click.pass_obj
def import_command(
    obj: Context,
    file: Path,
    fmt: str | None,
    max_prompt_chars: int | None,
    import_batch_size: int | None,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Upsert the prompts of FILE (CSV or JSONL) by id; report every rejected row.

    CSV needs a header with id (or external_id) and text (or prompt); optional columns are
    tags (separated by ';' or '|'), active (true/false) and metadata (a JSON object). JSONL
    holds one object per line with the same keys. Exit code 2 when rows were rejected.
    """
    settings = obj.settings
    quiet_logs(settings)
    url = database_url(settings)

    async def go() -> ImportReport:
        async with session(settings, url, migrate_schema=True) as pool, acquire(pool) as conn:
            return await import_prompts(
                conn,
                file,
                max_chars=max_prompt_chars or settings.max_prompt_chars,
                batch_size=import_batch_size or settings.import_batch_size,
                fmt=fmt,
                dry_run=dry_run,
            )

    report = asyncio.run(go())
    if as_json:
        print_json(report.to_json())
    else:
        out = console()
        for line in report.lines():
            out.print(line, soft_wrap=True)
    if report.rejected:
        raise InputError(
            f"{len(report.rejected):,} rows rejected; the {report.valid:,} valid rows were "
            + ("checked" if dry_run else "stored")
        )


COMMANDS = [prompts]

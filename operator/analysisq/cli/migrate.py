"""``analysisq migrate``: apply the schema migrations (idempotent)."""

from __future__ import annotations

import asyncio

import click

from analysisq.cli.common import database_url
from analysisq.cli.main import Context
from analysisq.db.connect import connect
from analysisq.db.migrate import migrate as apply_migrations
from analysisq.db.migrate import schema_version


@click.command()
@click.pass_obj
def migrate(obj: Context) -> None:
    """Apply the missing schema migrations; safe to run any number of times."""

    async def go() -> list[str]:
        settings = obj.settings
        conn = await connect(database_url(settings), pooler=settings.database_pooler)
        try:
            return [f"{m.version:04d}_{m.name}" for m in await apply_migrations(conn)]
        finally:
            await conn.close()

    applied = asyncio.run(go())
    if applied:
        click.echo(f"applied {', '.join(applied)}; schema at version {schema_version()}")
    else:
        click.echo(f"schema up to date at version {schema_version()}")


COMMANDS = [migrate]

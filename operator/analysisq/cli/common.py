"""The database the commands share: the configured URL or the embedded PostgreSQL, and a
small pool on it with the schema migrated or checked."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg

from analysisq.db.connect import acquire, open_pool
from analysisq.db.embedded import EmbeddedPostgres
from analysisq.db.migrate import check_schema, migrate
from analysisq.errors import ConfigError
from analysisq.settings import Settings

log = logging.getLogger("analysisq.cli")


def database_url(settings: Settings, *, embedded: bool = True) -> str:
    """The configured URL, or the embedded PostgreSQL under ``data_dir`` (started if needed)."""
    if settings.database_url:
        return settings.database_url
    if not embedded:
        raise ConfigError("no database configured: set DATABASE_URL or --database-url")
    pg = EmbeddedPostgres(settings.data_dir / "postgres")
    url = pg.start()
    log.info("using the embedded PostgreSQL", extra={"data_dir": str(pg.data_dir)})
    return url


@asynccontextmanager
async def session(
    settings: Settings, url: str, *, migrate_schema: bool = False
) -> AsyncIterator[asyncpg.Pool]:
    """A small pool on *url*, the schema migrated (or checked, for a database of our own
    choosing: an explicit URL is migrated only by commands that write)."""
    async with open_pool(url, pooler=settings.database_pooler, min_size=1, max_size=4) as pool:
        async with acquire(pool) as conn:
            if migrate_schema or not settings.database_url:
                await migrate(conn)
            else:
                await check_schema(conn)
        yield pool

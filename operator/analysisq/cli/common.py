"""Helpers the commands share: the database URL (explicit or embedded) and async running."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

from analysisq.db.embedded import EmbeddedPostgres
from analysisq.errors import ConfigError
from analysisq.settings import Settings

T = TypeVar("T")
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


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)

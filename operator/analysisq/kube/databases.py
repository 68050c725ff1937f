"""One asyncpg pool per database URL, each checked against this code's schema once.

A run's database is whatever URL its Secret holds (``spec.databaseSecretRef`` or the
operator's default Secret), the same one its workers use; usually every run shares the
operator's own database, whose pool is opened at start-up. A URL that cannot be reached
raises ``DatabaseUnavailable`` and is tried again on the next call; a URL whose schema is not
this code's raises ``SchemaMismatch`` every time until it is migrated.
"""

from __future__ import annotations

import asyncio

import asyncpg

from analysisq.db.connect import Pooler, acquire, create_pool, translated
from analysisq.db.migrate import check_schema
from analysisq.errors import DatabaseError


class DatabasePools:
    def __init__(self, *, pooler: Pooler = "none", max_size: int = 4) -> None:
        self._pooler: Pooler = pooler
        self._max_size = max_size
        self._pools: dict[str, asyncpg.Pool] = {}
        self._lock = asyncio.Lock()

    async def get(self, url: str) -> asyncpg.Pool:
        """The pool for *url*, opened and schema-checked on first use."""
        pool = self._pools.get(url)
        if pool is not None:
            return pool
        async with self._lock:
            pool = self._pools.get(url)
            if pool is None:
                pool = await create_pool(
                    url, pooler=self._pooler, min_size=1, max_size=self._max_size
                )
                try:
                    async with acquire(pool) as conn:
                        await check_schema(conn)
                except BaseException:
                    await pool.close()
                    raise
                self._pools[url] = pool
        return pool

    async def health(self, url: str | None) -> str:
        """The operator's own database for the liveness endpoint: reported, never raised (a
        database outage must not get the operator restarted; runs wait for it instead)."""
        if not url:
            return "not configured"
        try:
            async with asyncio.timeout(5):
                pool = await self.get(url)
                async with acquire(pool) as conn:
                    with translated("health check"):
                        await conn.fetchval("SELECT 1")
        except TimeoutError:
            return "unavailable: no answer within 5 s"
        except DatabaseError as exc:
            return f"unavailable: {exc.message}"
        return "ok"

    async def close(self) -> None:
        pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            await pool.close()

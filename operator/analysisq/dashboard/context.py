"""What every dashboard handler shares: the database, the access guard, the action backend.

The pool is opened on first use and again after a failure, so a dashboard started while the
database is down answers 503 ("database unavailable") until it is back, then just works.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import asyncpg
from aiohttp import web

from analysisq.dashboard.guard import Guard
from analysisq.db.connect import acquire, create_pool
from analysisq.queue.dashboard import FinishedRuns

if TYPE_CHECKING:
    from analysisq.dashboard.actions import Actions


@dataclass
class DashboardContext:
    database_url: str
    guard: Guard
    actions: Actions
    #: seconds between the page's polls of each panel
    refresh_seconds: float = 5.0
    #: statement timeout for the dashboard's queries: a slow panel must not pile up work
    statement_timeout_ms: int = 15000
    #: finished runs already counted (the runs list does not count them again)
    finished: FinishedRuns = field(default_factory=FinishedRuns, repr=False)
    _pool: asyncpg.Pool | None = field(default=None, repr=False)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)

    async def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            async with self._lock:
                if self._pool is None:
                    self._pool = await create_pool(
                        self.database_url,
                        min_size=0,
                        max_size=2,
                        timeout=5.0,
                        command_timeout=self.statement_timeout_ms / 1000,
                    )
        return self._pool

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        pool = await self.pool()
        async with acquire(pool) as conn:
            yield conn

    def actions_json(self) -> dict[str, Any]:
        """What the page may offer: which actions, and whether they need the token."""
        enabled = self.guard.allow_actions
        return {
            "enabled": enabled,
            "token_required": enabled and self.guard.action_token is not None,
            "available": sorted(self.actions.available) if enabled else [],
        }

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None


CONTEXT = web.AppKey("analysisq.dashboard", DashboardContext)


def context(request: web.Request) -> DashboardContext:
    return request.app[CONTEXT]

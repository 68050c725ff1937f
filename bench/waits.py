"""What the database's backends wait for while a benchmark runs: ``pg_stat_activity`` sampled.

``WaitSampler`` polls every 50 ms on a connection of its own and averages, over the samples,
the client backends that are active by wait event (``CPU`` when none), and of those waiting
for a heavyweight lock, which statement (its first comment line) waits: a lock that the
workers queue for shows there, a database that only waits for its clients shows
``Client:ClientRead``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter

import asyncpg

ACTIVITY = (
    "SELECT coalesce(wait_event_type, 'CPU') || ':' || coalesce(wait_event, '-') AS wait,"
    " wait_event_type = 'Lock' AS lock, left(query, 70) AS query FROM pg_stat_activity"
    " WHERE backend_type = 'client backend' AND state = 'active' AND pid <> pg_backend_pid()"
)


class WaitSampler:
    """``async with WaitSampler(url) as s: ...``; then ``s.figures()``."""

    def __init__(self, url: str, interval: float = 0.05) -> None:
        self.url = url
        self.interval = interval
        self.samples = 0
        self.waits: Counter[str] = Counter()
        self.locks: Counter[str] = Counter()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> WaitSampler:
        self._conn = await asyncpg.connect(self.url)
        self._task = asyncio.create_task(self._sample())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._conn.close()

    async def _sample(self) -> None:
        while True:
            rows = await self._conn.fetch(ACTIVITY)
            self.samples += 1
            for r in rows:
                self.waits[r["wait"]] += 1
                if r["lock"]:
                    self.locks[r["query"]] += 1
            await asyncio.sleep(self.interval)

    def figures(self) -> dict[str, object]:
        """Average active backends per wait event, and per lock-waiting statement."""
        n = max(self.samples, 1)
        return {
            "db_samples": self.samples,
            "db_active_by_wait": {k: round(v / n, 3) for k, v in self.waits.most_common(6)},
            "db_lock_waiting": round(sum(self.locks.values()) / n, 3),
            "db_lock_waiting_by_statement": {
                k: round(v / n, 3) for k, v in self.locks.most_common(3)
            },
        }

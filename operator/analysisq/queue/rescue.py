"""Stuck recovery: the seed's ``cleanup_stuck_queue_items()``, called from Python.

Three callers, as in the seed: the worker at start (and every lease period while it runs),
the operator's timer, and people or pg_cron through the SQL function itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from analysisq.db.connect import translated
from analysisq.db.sql import query


@dataclass(frozen=True)
class RescueResult:
    reset: int
    poisoned: int


async def cleanup_stuck(
    conn: asyncpg.Connection, run_id: str | None = None, stuck_after_seconds: float = 900
) -> RescueResult:
    """Requeue items whose lease expired (or stale for ``stuck_after_seconds``)."""
    with translated("resetting stuck items"):
        row = await conn.fetchrow(query("cleanup_stuck"), run_id, float(stuck_after_seconds))
    assert row is not None
    return RescueResult(reset=row["reset_count"], poisoned=row["poisoned_count"])

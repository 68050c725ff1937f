"""Rescue: stuck items back in the queue, the seed's ``cleanup_stuck_queue_items()`` called
from Python (``rescue_stuck``).

"Rescue" is the one name in the code. The callers: every worker at start and every quarter
lease, the operator's per-run timer (``RunService.rescue_stuck``, every
``stuck_reset_seconds``), ``analysisq run``'s supervisor (every
``rescue_interval_seconds``), ``analysisq cleanup``, and people or pg_cron through the SQL
function itself. A worker passes its live claims, which are never taken from it;
docs/states.md says which lease losses are charged to whom. The user-facing names (those
settings, ``lastStuckReset``, the ``StuckItemsReset`` Event, the SQL function) are the
seed's and the chart's, and kept.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from analysisq.db import sql
from analysisq.db.connect import translated


@dataclass(frozen=True)
class RescueResult:
    reset: int
    poisoned: int


async def rescue_stuck(
    conn: asyncpg.Connection,
    run_id: str | None = None,
    stuck_after_seconds: float = 900,
    *,
    live_tokens: Sequence[uuid.UUID] = (),
) -> RescueResult:
    """Requeue items whose lease expired (or stale for ``stuck_after_seconds``), except the
    claims in *live_tokens* (the caller's own, still being worked on)."""
    with translated("resetting stuck items"):
        row = await sql.fetchrow(
            conn,
            "rescue_stuck",
            run_id=run_id,
            stuck_after_seconds=float(stuck_after_seconds),
            live_tokens=list(live_tokens),
        )
    assert row is not None
    return RescueResult(reset=row["reset_count"], poisoned=row["poisoned_count"])

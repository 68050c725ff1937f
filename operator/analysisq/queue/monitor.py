"""The runbook's reads: one typed wrapper per named query, shared by the commands and the
live display of ``analysisq run``.

The seed's monitoring queries live in ``sql/queries.sql`` as ``status_breakdown``,
``stuck_items``, ``failed_items`` and ``error_summary`` (with our additions: a run filter, the
lease, the error class); the rest serve the progress display and the end-of-run summary.
Rows come back as plain dicts so that ``--json`` output and tables read the same data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import asyncpg

from analysisq.db import sql
from analysisq.db.connect import translated
from analysisq.queue.throughput import THROUGHPUT_WINDOW_SECONDS


def _dicts(rows: list[asyncpg.Record]) -> list[dict[str, Any]]:
    return [dict(r) for r in rows]


async def status_breakdown(conn: asyncpg.Connection, run_id: str | None) -> list[dict[str, Any]]:
    """The seed's first query: count and percentage per status (``cantidad``, ``porcentaje``)."""
    with translated("reading the queue status"):
        return _dicts(await sql.fetch(conn, "status_breakdown", run_id=run_id))


async def stuck_items(
    conn: asyncpg.Connection, run_id: str | None, older_than_seconds: float
) -> dict[str, Any]:
    """The seed's stuck query: processing items not updated for a while or with a dead lease."""
    with translated("reading stuck items"):
        row = await sql.fetchrow(
            conn, "stuck_items", run_id=run_id, older_than_seconds=float(older_than_seconds)
        )
    assert row is not None
    return dict(row)


async def failed_items(
    conn: asyncpg.Connection, run_id: str | None, limit: int
) -> list[dict[str, Any]]:
    """The newest failed items, retrying or for good (``will_retry``)."""
    with translated("reading failed items"):
        return _dicts(await sql.fetch(conn, "failed_items", run_id=run_id, limit=limit))


async def error_summary(
    conn: asyncpg.Connection, run_id: str | None, limit: int
) -> list[dict[str, Any]]:
    """Failed items grouped by class and message, most frequent first."""
    with translated("reading errors"):
        return _dicts(await sql.fetch(conn, "error_summary", run_id=run_id, limit=limit))


async def error_classes(conn: asyncpg.Connection, run_id: str) -> dict[str, int]:
    """Items by the class of their last error (a completion clears it): failed, retrying,
    and pending items released after a 429, an auth failure or a lost lease."""
    with translated("reading error classes"):
        rows = await sql.fetch(conn, "error_classes", run_id=run_id)
    return {r["error_class"]: r["count"] for r in rows}


async def throughput(
    conn: asyncpg.Connection, run_id: str, window_seconds: float = THROUGHPUT_WINDOW_SECONDS
) -> float:
    """Items per second completed over the last *window_seconds* (``queue.throughput``)."""
    with translated("reading throughput"):
        n = await sql.fetchval(
            conn, "throughput", run_id=run_id, window_seconds=float(window_seconds)
        )
    return float(n) / window_seconds


@dataclass(frozen=True)
class Backlog:
    """Open items of one target."""

    target: str
    processing: int
    waiting: int


async def target_backlog(conn: asyncpg.Connection, run_id: str) -> list[Backlog]:
    with translated("reading the backlog per target"):
        rows = await sql.fetch(conn, "target_backlog", run_id=run_id)
    return [Backlog(**dict(r)) for r in rows]


@dataclass(frozen=True)
class RetryReport:
    """How retries went: attempts needed by completed items, 429 deferrals, lost leases."""

    completed_by_attempt: dict[int, int]
    deferrals: int
    deferred_items: int
    lease_lost_items: int

    @property
    def recovered(self) -> int:
        """Completed items that needed more than one attempt."""
        return sum(n for attempt, n in self.completed_by_attempt.items() if attempt > 1)


async def retry_report(conn: asyncpg.Connection, run_id: str) -> RetryReport:
    with translated("reading retry statistics"):
        rows = await sql.fetch(conn, "completed_by_attempt", run_id=run_id)
        totals = await sql.fetchrow(conn, "retry_totals", run_id=run_id)
    assert totals is not None
    return RetryReport(
        completed_by_attempt={r["attempt"]: r["count"] for r in rows},
        deferrals=totals["deferrals"],
        deferred_items=totals["deferred_items"],
        lease_lost_items=totals["lease_lost_items"],
    )


async def results_page(
    conn: asyncpg.Connection, run_id: str, after_id: int, limit: int
) -> list[dict[str, Any]]:
    """Results with ``id > after_id``, in id order (keyset paging)."""
    with translated("reading results"):
        return _dicts(
            await sql.fetch(conn, "results_page", run_id=run_id, after_id=after_id, limit=limit)
        )

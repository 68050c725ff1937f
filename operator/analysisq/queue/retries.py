"""Bulk retry: give a run's failed-for-good items another chance after a fix.

``retry_failed`` is what ``analysisq retry``, the AnalysisRun's retry annotation and the
dashboard call. It is the only way back from "failed for good": the item becomes pending
with its attempts, deferrals and lease losses reset, and the error that failed it is kept in
``last_error`` (``retries`` counts how often). The per-error retry policy is ``retry``.
"""

from __future__ import annotations

import asyncpg

from analysisq.db import sql
from analysisq.db.connect import translated
from analysisq.errors import ConfigError, ErrorClass


async def retry_failed(
    conn: asyncpg.Connection,
    run_id: str,
    *,
    error_class: str | None = None,
    target: str | None = None,
    error: str | None = None,
) -> int:
    """Put the failed-for-good items of *run_id* back; return how many.

    Filters combine: only items of ``error_class`` (an ``ErrorClass`` value), of ``target``,
    and whose error message contains ``error`` (case-insensitive). A finished run that gets
    items back is open again (its workers pick them up)."""
    if error_class is not None and error_class not in set(ErrorClass):
        known = ", ".join(c.value for c in ErrorClass)
        raise ConfigError(f"unknown error class {error_class!r}; one of: {known}")
    with translated(f"retrying failed items of run {run_id}"):
        async with conn.transaction():
            await sql.execute(conn, "lock_retry_targets", run_id=run_id, target=target)
            count: int = await sql.fetchval(
                conn,
                "retry_failed",
                run_id=run_id,
                error_class=error_class,
                target=target,
                error=error or None,
            )
    return count

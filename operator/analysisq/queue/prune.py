"""Retention: remove finished runs' queue rows (and, when asked, their results).

``prune`` finds the runs finished longer ago than a horizon (``prunable_runs``), optionally
exports each run's results (``analysisq.local.export``), and deletes in bounded batches, one
short transaction per batch: terminal queue rows only, ``FOR UPDATE SKIP LOCKED``, so a prune
running next to live workers never waits on a claim and never holds a lock a claim needs.
A run whose queue rows are all gone is marked ``pruned_at``; its ``analysis_runs`` row stays
(the history of runs, and ``analysisq results`` when the results were kept).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime

import asyncpg

from analysisq.db import sql
from analysisq.db.connect import translated

#: Rows per delete statement: small enough that each transaction is short (milliseconds) and
#: its WAL and lock footprint bounded, large enough that 1M rows take few round trips.
DEFAULT_BATCH = 5_000


@dataclass(frozen=True)
class PrunableRun:
    id: str
    finished_at: datetime


@dataclass
class PruneReport:
    runs: list[str] = field(default_factory=list)
    queue_rows: int = 0
    results: int = 0
    exported: int = 0
    #: Runs that still have queue rows (open items of a run retried after it finished, or
    #: rows locked during the prune): the next prune takes them.
    incomplete: list[str] = field(default_factory=list)


async def prunable_runs(
    conn: asyncpg.Connection, older_than_seconds: float, *, results: bool
) -> list[PrunableRun]:
    with translated("listing runs to prune"):
        rows = await sql.fetch(
            conn, "prunable_runs", older_than_seconds=float(older_than_seconds), results=results
        )
    return [PrunableRun(r["id"], r["finished_at"]) for r in rows]


async def _delete_batches(conn: asyncpg.Connection, name: str, run_id: str, batch: int) -> int:
    total = 0
    while True:
        with translated(f"pruning run {run_id}"):
            status = await sql.execute(conn, name, run_id=run_id, batch=batch)
        deleted = int(status.rsplit(" ", 1)[1])
        total += deleted
        if deleted < batch:
            return total


async def prune(
    conn: asyncpg.Connection,
    older_than_seconds: float,
    *,
    results: bool = False,
    export: Callable[[asyncpg.Connection, str], Awaitable[int]] | None = None,
    batch: int = DEFAULT_BATCH,
) -> PruneReport:
    """Prune every run finished more than *older_than_seconds* ago.

    *results*: delete the runs' results too, after *export* (if given) wrote them; an export
    that raises stops the prune before that run's results are touched.
    """
    report = PruneReport()
    for run in await prunable_runs(conn, older_than_seconds, results=results):
        report.queue_rows += await _delete_batches(conn, "prune_queue_batch", run.id, batch)
        if results:
            if export is not None:
                report.exported += await export(conn, run.id)
            report.results += await _delete_batches(conn, "prune_results_batch", run.id, batch)
        with translated(f"pruning run {run.id}"):
            marked = await sql.fetchval(conn, "mark_pruned", run_id=run.id)
        (report.runs if marked is not None else report.incomplete).append(run.id)
    return report

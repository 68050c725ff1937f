"""The dashboard's reads and the provider metrics' source: one typed wrapper per panel query.

Each panel of ``analysisq dashboard`` (and each series of the operator's provider metrics)
is one named query of ``sql/queries.sql`` that reads a single run through an index led by
``run_id``; the web layer (``analysisq.dashboard``) turns these rows into JSON and HTML and
holds no SQL. Rows come back as plain dicts, ready for JSON, except where Python derives
something from them (a run's phase, the latency histogram).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import asyncpg

from analysisq.db import sql
from analysisq.db.connect import translated
from analysisq.queue.states import Counts
from analysisq.queue.throughput import THROUGHPUT_WINDOW_SECONDS


@dataclass(frozen=True)
class RunSummary:
    """One run as the runs table shows it."""

    id: str
    name: str
    created_at: datetime
    filled_at: datetime | None
    finished_at: datetime | None
    suspended: bool
    max_failed_ratio: float
    counts: Counts
    throughput: float
    paused_targets: int
    cost: float | None

    @property
    def phase(self) -> str:
        """The AnalysisRun's phase vocabulary, derived from the database alone."""
        if self.filled_at is None:
            return "Pending"
        if self.counts.done or self.finished_at is not None:
            return "Failed" if self.counts.failed_too_often(self.max_failed_ratio) else "Succeeded"
        return "Suspended" if self.suspended else "Running"

    @property
    def eta_seconds(self) -> float | None:
        """Seconds until every open item is done at the current throughput (None if idle)."""
        left = self.counts.total - self.counts.terminal
        if left == 0:
            return 0.0
        return left / self.throughput if self.throughput > 0 else None


def _summary(row: asyncpg.Record) -> RunSummary:
    counts = Counts.from_row(row)
    return RunSummary(
        id=row["id"],
        name=row["name"],
        created_at=row["created_at"],
        filled_at=row["filled_at"],
        finished_at=row["finished_at"],
        suspended=row["suspended"],
        max_failed_ratio=row["max_failed_ratio"],
        counts=counts,
        throughput=row["recent"] / THROUGHPUT_WINDOW_SECONDS,
        paused_targets=row["paused_targets"],
        cost=row["cost"],
    )


class FinishedRuns:
    """Summaries of finished runs, which the runs list does not count again.

    A finished run's items no longer change (a bulk retry reopens the run: its
    ``finished_at`` is cleared), so after one count its summary is reused for as long as its
    ``finished_at`` is the same. Holds the finished runs of the latest lists only.
    """

    def __init__(self, keep: int = 500) -> None:
        self._held: dict[str, RunSummary] = {}
        self._keep = keep

    def snapshot(self) -> dict[str, RunSummary]:
        return dict(self._held)

    def resolve(
        self, rows: Sequence[asyncpg.Record], snapshot: dict[str, RunSummary]
    ) -> list[RunSummary]:
        out = [_summary(r) if r["counted"] else snapshot[r["id"]] for r in rows]
        for s in out:
            if s.finished_at is not None:
                self._held[s.id] = replace(s, throughput=0.0)
        while len(self._held) > self._keep:
            self._held.pop(next(iter(self._held)))
        return out


async def run_summaries(
    conn: asyncpg.Connection, limit: int, finished: FinishedRuns | None = None
) -> list[RunSummary]:
    """The newest *limit* runs with counts, throughput and paused targets; the items of
    runs that *finished* already holds are not counted again."""
    finished = finished or FinishedRuns()
    snapshot = finished.snapshot()
    held = [s for s in snapshot.values() if s.finished_at is not None]
    with translated("listing runs"):
        rows = await sql.fetch(
            conn,
            "dashboard_runs",
            limit=limit,
            window_seconds=THROUGHPUT_WINDOW_SECONDS,
            run_id=None,
            known_ids=[s.id for s in held],
            known_finished_at=[s.finished_at for s in held],
        )
    return finished.resolve(rows, snapshot)


async def run_summary(conn: asyncpg.Connection, run_id: str) -> RunSummary | None:
    """One run's summary by exact id, or None."""
    with translated(f"reading run {run_id}"):
        row = await sql.fetchrow(
            conn,
            "dashboard_runs",
            limit=1,
            window_seconds=THROUGHPUT_WINDOW_SECONDS,
            run_id=run_id,
            known_ids=[],
            known_finished_at=[],
        )
    return None if row is None else _summary(row)


async def run_exists(conn: asyncpg.Connection, run_id: str) -> bool:
    with translated(f"reading run {run_id}"):
        return bool(await sql.fetchval(conn, "dashboard_run_exists", run_id=run_id))


def _dicts(rows: Sequence[asyncpg.Record]) -> list[dict[str, Any]]:
    return [dict(r) for r in rows]


async def timeline(conn: asyncpg.Connection, run_id: str, buckets: int) -> list[dict[str, Any]]:
    """Cumulative completed / failed-for-good and open items at *buckets* + 1 instants from
    the run's creation to its end (or now)."""
    with translated(f"reading the timeline of run {run_id}"):
        return _dicts(await sql.fetch(conn, "dashboard_timeline", run_id=run_id, buckets=buckets))


async def target_stats(conn: asyncpg.Connection, run_id: str) -> list[dict[str, Any]]:
    """Per target: counts, throughput, latency percentiles, tokens, cost and pause."""
    with translated(f"reading the targets of run {run_id}"):
        rows = _dicts(
            await sql.fetch(
                conn, "dashboard_targets", run_id=run_id, window_seconds=THROUGHPUT_WINDOW_SECONDS
            )
        )
    for row in rows:
        row["throughput"] = row.pop("recent") / THROUGHPUT_WINDOW_SECONDS
    return rows


async def failed_items(
    conn: asyncpg.Connection, run_id: str, limit: int, excerpt_chars: int
) -> list[dict[str, Any]]:
    """The newest failed items (retrying or for good) with a prompt excerpt."""
    with translated(f"reading failed items of run {run_id}"):
        return _dicts(
            await sql.fetch(
                conn,
                "dashboard_failed_items",
                run_id=run_id,
                limit=limit,
                excerpt_chars=excerpt_chars,
            )
        )


async def stuck_items(
    conn: asyncpg.Connection, run_id: str, older_than_seconds: float, limit: int
) -> list[dict[str, Any]]:
    """Processing items with an expired lease or no update for *older_than_seconds*."""
    with translated(f"reading stuck items of run {run_id}"):
        return _dicts(
            await sql.fetch(
                conn,
                "dashboard_stuck_items",
                run_id=run_id,
                older_than_seconds=float(older_than_seconds),
                limit=limit,
            )
        )


# --- provider metrics ------------------------------------------------------------------------


@dataclass
class TargetCalls:
    """What the database knows of one target's provider calls within a run."""

    outcomes: dict[str, int] = field(default_factory=dict)
    deferrals: int = 0
    #: cumulative calls with latency below each bound (same order as the bounds), then all
    latency_buckets: list[int] = field(default_factory=list)
    latency_count: int = 0
    latency_seconds: float = 0.0


async def provider_calls(
    conn: asyncpg.Connection, run_id: str, bounds: Sequence[float]
) -> dict[str, TargetCalls]:
    """Per target: items by latest outcome, 429 deferrals, the latency histogram over
    *bounds* (seconds, ascending), from the queue and the results (tokens and cost are
    ``queue.usage``'s)."""
    with translated(f"reading provider calls of run {run_id}"):
        outcomes = await sql.fetch(conn, "provider_outcomes", run_id=run_id)
        latency = await sql.fetch(conn, "provider_latency", run_id=run_id, bounds=list(bounds))
    out: dict[str, TargetCalls] = {}
    for r in outcomes:
        calls = out.setdefault(r["target"], TargetCalls())
        if r["outcome"] is not None:
            calls.outcomes[r["outcome"]] = r["items"]
        calls.deferrals += r["deferrals"]
    per_bucket: dict[str, list[int]] = {}
    for r in latency:
        calls = out.setdefault(r["target"], TargetCalls())
        # width_bucket: 0 below the first bound, i for [bound i, bound i+1)
        counts = per_bucket.setdefault(r["target"], [0] * (len(bounds) + 1))
        counts[r["bucket"]] += r["calls"]
        calls.latency_count += r["calls"]
        calls.latency_seconds += float(r["seconds"])
    for target, counts in per_bucket.items():
        running, cumulative = 0, []
        for n in counts[: len(bounds)]:
            running += n
            cumulative.append(running)
        out[target].latency_buckets = cumulative
    return out

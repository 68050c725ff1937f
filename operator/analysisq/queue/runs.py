"""Runs: record a run and its targets, fill its queue, read its counts.

A run is identified by a caller-chosen id (the operator uses the AnalysisRun's namespace/name,
``analysisq run`` a generated one) and carries its validated spec, so a worker started with
only ``--run ID`` knows the targets, limits and lease of the run it serves.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from analysisq.db import sql
from analysisq.db.connect import translated
from analysisq.db.text import db_text
from analysisq.errors import BatchesOpen, RunNotFound, SpecError
from analysisq.queue import budget, ratelimit
from analysisq.queue.states import Counts
from analysisq.spec import AnalysisRunSpec, parse_spec


@dataclass(frozen=True)
class Run:
    id: str
    name: str
    spec: AnalysisRunSpec
    filled_at: datetime | None
    finished_at: datetime | None
    created_at: datetime


@dataclass(frozen=True)
class FillResult:
    inserted: int
    missing_ids: list[str]


def _run(row: asyncpg.Record) -> Run:
    return Run(
        id=row["id"],
        name=row["name"],
        spec=parse_spec(json.loads(row["spec"]), source=f"run {row['id']}"),
        filled_at=row["filled_at"],
        finished_at=row["finished_at"],
        created_at=row["created_at"],
    )


async def create_run(
    conn: asyncpg.Connection, run_id: str, spec: AnalysisRunSpec, *, name: str | None = None
) -> None:
    """Record the run and its targets (idempotent; a changed spec updates the limits).

    Raises ``SpecError`` when a target's shared rate pool is held by another unfinished run
    with other limits (``ratelimit.register``).
    """
    with translated(f"recording run {run_id}"):
        async with conn.transaction():
            await _check_models(conn, run_id, spec)
            before = await sql.fetchval(conn, "run_max_attempts", run_id=run_id)
            await sql.execute(
                conn,
                "upsert_run",
                run_id=run_id,
                name=name or run_id,
                spec=json.dumps(spec.to_json()),
                max_attempts=spec.max_attempts,
                max_lease_losses=spec.max_lease_losses,
                lease_seconds=spec.lease_seconds,
            )
            if before is not None and spec.max_attempts < before:
                # Only a lowered maxAttempts touches the queue (a fill may hold its lock).
                await sql.execute(conn, "finalize_exhausted", run_id=run_id)
            for i, t in enumerate(spec.targets):
                rl, price = t.rate_limit, t.pricing
                await sql.execute(
                    conn,
                    "upsert_run_target",
                    run_id=run_id,
                    target=t.name,
                    requests_per_second=rl.requests_per_second if rl else None,
                    tokens_per_minute=rl.tokens_per_minute if rl else None,
                    pool=await ratelimit.register(conn, run_id, i, t),
                    input_per_million=price.input_per_million_tokens if price else None,
                    output_per_million=price.output_per_million_tokens if price else None,
                    batch_discount=price.batch_discount if price else None,
                    fault_threshold=spec.target_fault_threshold,
                )
            await budget.set_budget(conn, run_id, spec.budget)


async def _check_models(conn: asyncpg.Connection, run_id: str, spec: AnalysisRunSpec) -> None:
    """A target's provider and model may change only while it has no result: a misspelt
    model can be fixed (the circuit breaker paused it before any answer), but results of two
    models never mix in one target."""
    row = await sql.fetchrow(conn, "get_run", run_id=run_id)
    if row is None:
        return
    old = {t.name: t for t in parse_spec(json.loads(row["spec"]), source=f"run {run_id}").targets}
    for t in spec.targets:
        was = old.get(t.name)
        if was is None or (was.provider, was.model) == (t.provider, t.model):
            continue
        if await sql.fetchval(conn, "target_has_results", run_id=run_id, target=t.name):
            raise SpecError(
                f"targets[{t.name}]: the provider and model cannot change from "
                f"{was.provider}:{was.model} to {t.provider}:{t.model}, the target has results "
                "(they would mix two analyses); create a new run instead"
            )


async def fill(conn: asyncpg.Connection, run_id: str, spec: AnalysisRunSpec) -> FillResult:
    """Enqueue the selected prompts x targets; safe to repeat after any crash."""
    sel = spec.prompts
    with translated(f"filling run {run_id}"):
        inserted = await sql.fetchval(
            conn,
            "fill_run",
            run_id=run_id,
            targets=[t.name for t in spec.targets],
            tags=sel.tags,
            ids=sel.ids,
        )
        await sql.execute(conn, "mark_filled", run_id=run_id)
        missing = (
            [r[0] for r in await sql.fetch(conn, "missing_prompt_ids", ids=sel.ids)]
            if sel.ids
            else []
        )
    return FillResult(inserted=int(inserted), missing_ids=missing)


async def get_run(conn: asyncpg.Connection, run_id: str) -> Run:
    """The run with this id, or the newest run with this name."""
    with translated(f"reading run {run_id}"):
        row = await sql.fetchrow(conn, "find_run", id_or_name=run_id)
    if row is None:
        raise RunNotFound(f"no run {run_id!r}; `analysisq runs` lists them")
    return _run(row)


async def list_runs(conn: asyncpg.Connection, limit: int = 20) -> list[asyncpg.Record]:
    with translated("listing runs"):
        return list(await sql.fetch(conn, "list_runs", limit=limit))


async def counts(conn: asyncpg.Connection, run_id: str) -> Counts:
    with translated(f"counting run {run_id}"):
        row = await sql.fetchrow(conn, "run_counts", run_id=run_id)
    assert row is not None
    return Counts.from_row(row)


async def mark_finished(conn: asyncpg.Connection, run_id: str) -> None:
    with translated(f"finishing run {run_id}"):
        await sql.execute(conn, "mark_finished", run_id=run_id)


async def delete_run(conn: asyncpg.Connection, run_id: str) -> None:
    """Remove the run, its queue rows and results; ``BatchesOpen`` (nothing removed) while
    one of its provider batches is open."""
    with translated(f"deleting run {run_id}"):
        still_open = await sql.fetchval(conn, "delete_run", run_id=run_id)
    if still_open:
        raise BatchesOpen(
            f"run {run_id} has {still_open} open provider batches: its rows are kept until "
            "they are cancelled and their results ingested"
        )
    await ratelimit.forget_unused(conn)


@dataclass(frozen=True)
class TargetState:
    target: str
    requests_per_second: float | None
    tokens_per_minute: int | None
    pool: str
    paused_at: datetime | None
    pause_reason: str | None
    #: Set while the circuit breaker counts a target fault; a paused target with a fault was
    #: paused by the breaker (fix the setting its reason names), without one by a refused key.
    fault: str | None = None


async def targets(conn: asyncpg.Connection, run_id: str) -> list[TargetState]:
    with translated(f"reading targets of run {run_id}"):
        rows = await sql.fetch(conn, "run_targets", run_id=run_id)
    return [TargetState(**dict(r)) for r in rows]


async def pause_target(conn: asyncpg.Connection, run_id: str, target: str, reason: str) -> bool:
    """Pause a target for the run (auth failure, the breaker); True if this call paused it."""
    with translated(f"pausing target {target}"):
        row = await sql.fetchval(
            conn, "pause_target", run_id=run_id, target=target, reason=db_text(reason, 2000)
        )
        return row is not None


async def resume_targets(
    conn: asyncpg.Connection, run_id: str, target: str | None = None
) -> list[str]:
    """Resume one paused target, or all of the run's; returns those resumed."""
    with translated(f"resuming targets of run {run_id}"):
        async with conn.transaction():
            resumed = [
                r[0] for r in await sql.fetch(conn, "resume_target", run_id=run_id, target=target)
            ]
            if resumed:
                await sql.execute(conn, "unpark_targets", run_id=run_id, targets=resumed)
    return resumed

"""A run's budget: tokens and cost reserved before each request, settled after its answer.

``budget: {maxCost, maxTokens}`` is stored on the run's row with what it has spent (answers
the provider charged) and what it has reserved (requests in flight). A request is sent only
if spent + reserved + its own estimate fit (``reserve``); when one does not, the run is
marked exhausted and every worker stops claiming: the run is Paused with reason
``BudgetExhausted`` and every item stays pending. A changed budget (a patch, or
``analysisq run --resume RUN --budget ...``) lifts the pause.

The overshoot bound: spent <= budget + the sum over requests in flight of (usage - estimate).
Output tokens never exceed the estimate's ``max_tokens`` ceiling, so only prompts whose
tokens the four-characters rule under-counts can overshoot, by their excess alone. A worker
killed mid-request leaves its reservation counted: the budget errs on the side of spending
less.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

from analysisq.db import sql
from analysisq.db.connect import translated
from analysisq.spec import Budget
from analysisq.tokens import TokenEstimate


@dataclass(frozen=True)
class BudgetState:
    max_cost: float | None
    max_tokens: int | None
    spent_cost: float
    spent_tokens: int
    reserved_cost: float
    reserved_tokens: int
    budget_exhausted_at: datetime | None

    @property
    def exhausted(self) -> bool:
        return self.budget_exhausted_at is not None

    def describe(self) -> str:
        """``spent 1.2 of 2.5 (cost), 300,000 of 500,000 tokens`` for what is set."""
        parts = []
        if self.max_cost is not None:
            parts.append(f"cost {self.spent_cost:.4g} of {self.max_cost:g}")
        if self.max_tokens is not None:
            parts.append(f"{self.spent_tokens:,} of {self.max_tokens:,} tokens")
        return "spent " + ", ".join(parts)


async def set_budget(conn: asyncpg.Connection, run_id: str, budget: Budget | None) -> None:
    """Store the run's budget; a changed one lifts a BudgetExhausted pause."""
    max_cost = budget.max_cost if budget else None
    max_tokens = budget.max_tokens if budget else None
    with translated(f"setting the budget of run {run_id}"):
        await sql.execute(
            conn, "budget_set", run_id=run_id, max_cost=max_cost, max_tokens=max_tokens
        )


async def reserve(
    conn: asyncpg.Connection,
    run_id: str,
    target: str,
    estimate: TokenEstimate,
    *,
    via_batch: bool = False,
    pause: bool = True,
) -> bool:
    """Reserve one request's tokens and cost (at the batch discount if *via_batch*); False
    if they do not fit, and then the run is paused (unless not *pause*: the batch driver
    tries a smaller batch first)."""
    with translated(f"reserving budget of run {run_id}"):
        ok = await sql.fetchval(
            conn,
            "budget_reserve",
            run_id=run_id,
            target=target,
            tokens_in=estimate.input,
            tokens_out=estimate.output,
            via_batch=via_batch,
        )
    if ok is None and pause:
        await exhaust(conn, run_id)
    return ok is not None


async def exhaust(conn: asyncpg.Connection, run_id: str) -> None:
    """Pause the run for its budget: a request did not fit (workers stop claiming)."""
    with translated(f"pausing run {run_id} for its budget"):
        await sql.execute(conn, "budget_exhaust", run_id=run_id)


async def settle(
    conn: asyncpg.Connection,
    run_id: str,
    target: str,
    estimate: TokenEstimate,
    tokens_in: int,
    tokens_out: int,
    *,
    via_batch: bool = False,
) -> None:
    """Release a request's reservation and spend what the provider charged (both at the
    batch discount if *via_batch*)."""
    with translated(f"settling budget of run {run_id}"):
        await sql.execute(
            conn,
            "budget_settle",
            run_id=run_id,
            target=target,
            reserved_in=estimate.input,
            reserved_out=estimate.output,
            spent_in=tokens_in,
            spent_out=tokens_out,
            via_batch=via_batch,
        )


async def state(conn: asyncpg.Connection, run_id: str) -> BudgetState | None:
    """The run's budget and spending; ``None`` for a run without a budget."""
    with translated(f"reading the budget of run {run_id}"):
        row = await sql.fetchrow(conn, "budget_state", run_id=run_id)
    if row is None or (row["max_cost"] is None and row["max_tokens"] is None):
        return None
    return BudgetState(**dict(row))

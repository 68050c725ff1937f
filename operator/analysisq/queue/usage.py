"""Tokens and cost of a run's stored answers, per target and in total.

Cost is computed in SQL by ``token_cost`` (``sql/schema.sql``) from the tokens each answer
reports and the target's ``pricing`` as the run now states it, so a corrected price
re-prices the run. A target without pricing has no cost (``None``), not a cost of 0. The
dashboard, ``analysisq status``, the operator's status and the metrics all read these.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from analysisq.db import sql
from analysisq.db.connect import translated


@dataclass(frozen=True)
class TargetUsage:
    target: str
    pool: str
    answers: int
    tokens_in: int
    tokens_out: int
    cost: float | None


@dataclass(frozen=True)
class RunUsage:
    targets: list[TargetUsage]

    @property
    def tokens_in(self) -> int:
        return sum(t.tokens_in for t in self.targets)

    @property
    def tokens_out(self) -> int:
        return sum(t.tokens_out for t in self.targets)

    @property
    def cost(self) -> float | None:
        """The run's cost; ``None`` when no target has pricing."""
        costs = [t.cost for t in self.targets if t.cost is not None]
        return sum(costs) if costs else None


async def run_usage(conn: asyncpg.Connection, run_id: str) -> RunUsage:
    with translated(f"reading the usage of run {run_id}"):
        rows = await sql.fetch(conn, "usage_by_target", run_id=run_id)
    return RunUsage([TargetUsage(**dict(r)) for r in rows])


def format_cost(cost: float | None) -> str:
    """``0.0123`` style: four significant digits, ``-`` without pricing."""
    return "-" if cost is None else f"{cost:.4g}"

"""Per-target rate limits held in aggregate across every worker, through PostgreSQL.

Each target of a run has one ``run_targets`` row. A request reserves its slot with one
``UPDATE`` (GCRA: the row's theoretical arrival time moves by 1/rate, and by the estimated
token cost for a tokens-per-minute limit) and sleeps until the slot. The database clock is the
only clock, so workers on different machines agree. A 429 with ``Retry-After`` pushes the
row forward so no worker sends before the provider said it may.
"""

from __future__ import annotations

import asyncpg

from analysisq.db.connect import translated
from analysisq.db.sql import query
from analysisq.spec import Target

#: Characters per token for the estimate of a request's token cost.
CHARS_PER_TOKEN = 4


def estimate_tokens(target: Target, prompt: str) -> int:
    """Prompt tokens plus the completion budget (``max_tokens``, default 256)."""
    budget = target.params.get("max_tokens") or target.params.get("maxTokens") or 256
    return len(prompt) // CHARS_PER_TOKEN + int(budget)


def is_limited(target: Target) -> bool:
    rl = target.rate_limit
    return rl is not None and (rl.requests_per_second or rl.tokens_per_minute) is not None


async def acquire(conn: asyncpg.Connection, run_id: str, target: Target, prompt: str) -> float:
    """Reserve a request slot; return the seconds to wait before sending (0 = now)."""
    if not is_limited(target):
        return 0.0
    with translated(f"rate limiting target {target.name}"):
        wait = await conn.fetchval(
            query("rate_acquire"), run_id, target.name, float(estimate_tokens(target, prompt))
        )
    return float(wait or 0.0)


async def backoff(conn: asyncpg.Connection, run_id: str, target: str, seconds: float) -> None:
    """No worker sends to *target* for *seconds* (the provider's Retry-After)."""
    with translated(f"backing off target {target}"):
        await conn.execute(query("rate_backoff"), run_id, target, float(seconds))

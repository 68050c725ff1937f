"""Rate-limit pools held in aggregate across every worker of every run, through PostgreSQL.

Providers limit an API key, not a run, so the limiter's unit is a *pool*: targets that name
``rateLimit.pool`` share one ``rate_pools`` row with every run of the database naming it; a
target without one gets a private pool (``run:<run id>:<target>``), today's per-run limit.
A request reserves its slot with one ``UPDATE`` (GCRA: the row's theoretical arrival time
moves by 1/rate, and by the request's estimated tokens for a tokens-per-minute limit) and
sleeps until the slot; the answer's usage then corrects the token estimate (``settle``), for
later requests and for those already waiting for their slot (``token_debt``). The
database clock is the only clock, so workers on different machines agree. A 429's
``Retry-After`` sets the pool's ``blocked_until``: no worker of any run sends to the pool
before then, whether the target has a limit or not (the claim hands out no item of a
blocked pool). Nor does the claim hand out more items of a ``requestsPerSecond`` pool than
have a slot within ``rate_claim_horizon()`` (2 s; it promises them on the row, ``claim_tat``,
until their ``acquire``), so an item waits for its slot in the queue, not in a worker that
holds its lease (migration 0010, docs/quotas.md).

Limits of a shared pool: every unfinished run using it must state the same ones; a run that
states others is refused at creation (``register``). Once no unfinished run uses the pool,
the next run's limits replace them.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from analysisq.db import sql
from analysisq.db.connect import translated
from analysisq.errors import SpecError
from analysisq.spec import Target


def pool_name(run_id: str, target: Target) -> str:
    """The pool *target* of run *run_id* draws from."""
    rl = target.rate_limit
    if rl is not None and rl.pool is not None:
        return rl.pool
    return f"run:{run_id}:{target.name}"


def is_limited(target: Target) -> bool:
    rl = target.rate_limit
    return rl is not None and (rl.requests_per_second or rl.tokens_per_minute) is not None


async def register(conn: asyncpg.Connection, run_id: str, index: int, target: Target) -> str:
    """Create or join *target*'s pool (inside the run's transaction); return its name.

    Raises ``SpecError`` naming ``targets.<index>.rateLimit`` when another unfinished run
    holds the shared pool with other limits.
    """
    name = pool_name(run_id, target)
    rl = target.rate_limit
    rps = rl.requests_per_second if rl else None
    tpm = rl.tokens_per_minute if rl else None
    with translated(f"registering rate pool {name}"):
        current = await sql.fetchrow(
            conn, "pool_lock", pool=name, requests_per_second=rps, tokens_per_minute=tpm
        )
        assert current is not None
        if (current["requests_per_second"], current["tokens_per_minute"]) == (rps, tpm):
            return name
        users = await sql.fetch(conn, "pool_users", pool=name, run_id=run_id)
        if users:
            held = ", ".join(f"{u['run_id']} ({u['target']})" for u in users)
            raise SpecError(
                f"targets.{index}.rateLimit: pool {name!r} is used by unfinished runs {held} "
                f"with requestsPerSecond={_show(current['requests_per_second'])} and "
                f"tokensPerMinute={_show(current['tokens_per_minute'])}; state the same limits "
                f"(this run asks requestsPerSecond={_show(rps)}, tokensPerMinute={_show(tpm)})"
            )
        await sql.execute(
            conn, "pool_set_limits", pool=name, requests_per_second=rps, tokens_per_minute=tpm
        )
    return name


def _show(value: float | None) -> str:
    return "none" if value is None else f"{value:g}"


@dataclass(frozen=True)
class Slot:
    #: Seconds to wait before sending (0 = now).
    wait: float
    #: The pool's token debt when the slot was reserved (see ``token_debt``).
    debt: float


async def acquire(conn: asyncpg.Connection, pool: str, tokens: int) -> Slot:
    """Reserve a request slot costing *tokens*."""
    with translated(f"rate limiting pool {pool}"):
        row = await sql.fetchrow(conn, "pool_acquire", pool=pool, tokens=float(tokens))
    assert row is not None, f"rate pool {pool} is missing"
    return Slot(float(row["wait_seconds"]), float(row["token_debt"]))


async def token_debt(conn: asyncpg.Connection, pool: str) -> float:
    """Seconds answers costing more than reserved have pushed the pool's schedule, in total.

    A request that reserved its slot when the debt was D and wakes to find D + x waits x
    more: the correction reaches requests already scheduled, not only the next ones.
    """
    with translated(f"reading the token debt of pool {pool}"):
        return float(await sql.fetchval(conn, "pool_token_debt", pool=pool))


async def backoff(conn: asyncpg.Connection, run_id: str, target: str, seconds: float) -> None:
    """No worker of any run sends to the pool of *run_id*'s *target* for *seconds* (the
    provider's Retry-After), whether the target has a limit or not."""
    with translated(f"backing off target {target}"):
        await sql.execute(conn, "pool_block", run_id=run_id, target=target, seconds=float(seconds))


async def settle_tokens(conn: asyncpg.Connection, pool: str, delta: int) -> None:
    """Correct the pool's token reservation by *delta* tokens (used minus estimated)."""
    if delta:
        with translated(f"settling tokens of pool {pool}"):
            await sql.execute(conn, "pool_settle_tokens", pool=pool, delta=float(delta))


async def forget_unused(conn: asyncpg.Connection) -> None:
    """Drop pools no run refers to any more."""
    with translated("dropping unused rate pools"):
        await sql.execute(conn, "pool_forget_unused")

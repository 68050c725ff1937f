"""Bulk retry: failed-for-good items go back with their attempts reset and the error kept."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

from analysisq.db import sql
from analysisq.errors import ConfigError, ErrorClass, TargetFault
from analysisq.queue import items, retries, runs
from analysisq.queue.items import ClaimedItem
from support import add_prompts, new_run, spec

pytestmark = pytest.mark.db

NOT_FOUND = TargetFault("HTTP 404: model_not_found", fault="HTTP 404 model_not_found",
                        setting="model")  # fmt: skip

TWO = spec(
    targets=[
        {"name": "a", "provider": "echo", "model": "echo-1"},
        {"name": "b", "provider": "echo", "model": "echo-1"},
    ]
)


async def claim_all(db: asyncpg.Connection, run_id: str = "run-1") -> list[ClaimedItem]:
    return await items.claim(db, run_id, worker="w1", limit=100, lease_seconds=60)


async def fail_for_good(
    db: asyncpg.Connection, item: ClaimedItem, cls: ErrorClass, msg: str
) -> None:
    assert await items.fail(db, item, cls, msg, None)


async def states(db: asyncpg.Connection) -> dict[int, tuple[object, ...]]:
    rows = await db.fetch(
        "SELECT id, status, attempts, error_class, last_error, retries,"
        " next_attempt_at <= now() AS due FROM analysis_queue ORDER BY id"
    )
    return {r["id"]: tuple(r)[1:] for r in rows}


async def test_retry_puts_failed_items_back_with_the_error_kept(db: asyncpg.Connection) -> None:
    await add_prompts(db, 3)
    await new_run(db, s=TWO)
    got = await claim_all(db)
    by_target = {t: [i for i in got if i.target == t] for t in ("a", "b")}
    await fail_for_good(db, by_target["a"][0], ErrorClass.PERMANENT, "HTTP 404: model_not_found")
    await fail_for_good(db, by_target["a"][1], ErrorClass.INVALID_INPUT, "prompt too long")
    await fail_for_good(db, by_target["b"][0], ErrorClass.PERMANENT, "HTTP 400: Invalid Model")
    # a retrying failure is not "failed for good": bulk retry leaves it alone
    assert await items.fail(db, by_target["b"][1], ErrorClass.TRANSIENT, "timeout", 30.0)
    await runs.mark_finished(db, "run-1")

    assert await retries.retry_failed(db, "run-1", error_class="permanent", error="MODEL") == 2
    after = await states(db)
    for i in (by_target["a"][0], by_target["b"][0]):
        status, attempts, cls, last, n, due = after[i.id]
        assert (status, attempts, cls, n, due) == ("pending", 0, None, 1, True)
        assert isinstance(last, str) and last.startswith("permanent: HTTP 4")
    assert after[by_target["a"][1].id][:3] == ("failed", 1, "invalid_input")
    assert after[by_target["b"][1].id][:3] == ("failed", 1, "transient")
    assert await db.fetchval("SELECT finished_at FROM analysis_runs") is None

    again = await claim_all(db)
    assert {i.id for i in again} == {by_target["a"][0].id, by_target["b"][0].id}
    assert all(i.attempt == 1 for i in again)


async def test_retry_filters_by_target_and_parks_items_of_a_paused_target(
    db: asyncpg.Connection,
) -> None:
    await add_prompts(db, 2)
    await new_run(db, s=TWO)
    for i in await claim_all(db):
        await fail_for_good(db, i, ErrorClass.PERMANENT, "HTTP 404 Not Found")
    assert await runs.pause_target(db, "run-1", "b", "bad key")
    await db.execute("UPDATE run_targets SET fault = 'HTTP 404', fault_streak = 2")
    assert await retries.retry_failed(db, "run-1", target="b") == 2
    assert await retries.retry_failed(db, "run-1", target="b") == 0
    # the circuit breaker of the target retried starts over; the other keeps its count
    streaks = await db.fetch("SELECT target, fault_streak FROM run_targets ORDER BY target")
    assert [tuple(r) for r in streaks] == [("a", 2), ("b", 0)]
    parked = await db.fetch(
        "SELECT target, status, next_attempt_at = 'infinity' AS parked FROM analysis_queue"
        " WHERE status = 'pending'"
    )
    assert {tuple(r) for r in parked} == {("b", "pending", True)}
    assert await claim_all(db) == []
    assert await runs.resume_targets(db, "run-1", "b") == ["b"]
    assert {i.target for i in await claim_all(db)} == {"b"}
    assert await retries.retry_failed(db, "run-1") == 2  # the two of target a


async def test_an_unknown_error_class_is_refused_by_name(db: asyncpg.Connection) -> None:
    await add_prompts(db, 1)
    await new_run(db)
    with pytest.raises(ConfigError, match="unknown error class 'permament'; one of: transient"):
        await retries.retry_failed(db, "run-1", error_class="permament")


async def test_a_bulk_retry_racing_a_tripping_breaker_waits_instead_of_deadlocking(
    db: asyncpg.Connection, db_url: str, client_options: dict[str, Any]
) -> None:
    """The breaker locks the target row, then gives its failed items back; a bulk retry must
    take the same order, or the two deadlock and PostgreSQL aborts one (seen as an error)."""
    await add_prompts(db, 3)
    await new_run(db, s=spec(targetFaultThreshold=2))
    first, second, _ = await claim_all(db)
    assert await items.fail(db, first, ErrorClass.PERMANENT, NOT_FOUND.message, None,
                            fault=NOT_FOUND)  # fmt: skip
    breaker = await asyncpg.connect(db_url, **client_options)
    retrier = await asyncpg.connect(db_url, **client_options)
    try:
        async with breaker.transaction():
            # the breaker's first step for the second fault: lock the target row
            await sql.fetchrow(breaker, "lock_item_target", item_id=second.id)
            retry = asyncio.create_task(retries.retry_failed(retrier, "run-1"))
            for _ in range(200):
                # by database, not by pid: behind PgBouncer the client never learns the pid
                waiting = await db.fetchval(
                    "SELECT count(*) > 0 FROM pg_stat_activity"
                    " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
                if waiting:
                    break
                await asyncio.sleep(0.02)
            else:
                pytest.fail("the bulk retry never waited for the breaker's lock")
            # the second fault trips the breaker: it gives back the first item too
            assert await items.fail(breaker, second, ErrorClass.PERMANENT, NOT_FOUND.message,
                                    None, fault=NOT_FOUND)  # fmt: skip
        assert await retry == 0  # both went back parked with the pause: nothing failed is left
    finally:
        await breaker.close()
        await retrier.close()
    rows = await db.fetch(
        "SELECT status, next_attempt_at = 'infinity' AS parked FROM analysis_queue"
        " WHERE id = ANY ($1)",
        [first.id, second.id],
    )
    assert [tuple(r) for r in rows] == [("pending", True), ("pending", True)]

"""``complete_and_claim``: one statement that writes a batch and claims the next, with the
fencing and write-once of ``complete`` and the order and leases of ``claim``."""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any

import asyncpg
import pytest

from analysisq.completion import Completion
from analysisq.db.connect import connect
from analysisq.queue import items, rescue, runs
from analysisq.queue.items import ClaimedItem, Outcome
from analysisq.settings import Settings
from analysisq.worker import Worker
from support import add_prompts, new_run, spec

pytestmark = pytest.mark.db

OK = Completion("answer", {"a": 1}, 10, 5, "echo-1", 12.5)


async def claim(db: asyncpg.Connection, n: int) -> list[ClaimedItem]:
    return await items.claim(db, "run-1", worker="w1", limit=n, lease_seconds=60)  # fmt: skip


async def complete_and_claim(
    db: asyncpg.Connection, done: list[ClaimedItem], n: int, worker: str = "w1"
) -> tuple[set[int], list[ClaimedItem]]:
    return await items.complete_and_claim(
        db, [Outcome(i, OK) for i in done], "run-1", worker=worker, limit=n,
        lease_seconds=60,
    )  # fmt: skip


async def test_writes_the_batch_and_claims_the_freed_slots(db: asyncpg.Connection) -> None:
    await add_prompts(db, 10)
    await new_run(db)
    held = await claim(db, 4)
    written, claimed = await complete_and_claim(db, held[:3], 3)
    assert written == {i.id for i in held[:3]}
    assert len(claimed) == 3 and not {i.id for i in claimed} & {i.id for i in held}
    assert all(i.attempt == 1 and i.text for i in claimed)
    rows = await db.fetch(
        "SELECT q.id, q.status, q.lease_owner, q.claim_token, r.attempt, r.response_text"
        " FROM analysis_queue q LEFT JOIN analysis_results r ON r.queue_id = q.id"
        " WHERE q.status <> 'pending' ORDER BY q.id"
    )
    by_id = {r["id"]: r for r in rows}
    for i in held[:3]:
        assert by_id[i.id]["status"] == "completed" and by_id[i.id]["response_text"] == "answer"
    for i in [held[3], *claimed]:
        r = by_id[i.id]
        assert (r["status"], r["lease_owner"], r["response_text"]) == ("processing", "w1", None)
    assert {by_id[i.id]["claim_token"] for i in claimed} == {i.token for i in claimed}


async def test_fenced_and_written_once(db: asyncpg.Connection) -> None:
    await add_prompts(db, 6)
    await new_run(db)
    held = await claim(db, 3)
    stale = dataclasses.replace(held[0], token=uuid.uuid4())  # someone else's claim now
    written, claimed = await complete_and_claim(db, [stale, held[1]], 0)
    assert written == {held[1].id} and claimed == []
    # the same answers again (a retried flush): nothing is written twice
    written, _ = await complete_and_claim(db, [held[1]], 0)
    assert written == set()
    assert await db.fetchval("SELECT count(*) FROM analysis_results") == 1
    assert await db.fetchval(
        "SELECT status FROM analysis_queue WHERE id = $1", held[0].id
    ) == "processing"  # fmt: skip


async def test_a_rescued_item_is_not_written_but_can_be_claimed_again(
    db: asyncpg.Connection,
) -> None:
    await add_prompts(db, 2)
    await new_run(db)
    (lost, other) = await claim(db, 2)
    await db.execute("UPDATE analysis_queue SET lease_expires_at = now() - interval '1 s'")
    assert (await rescue.rescue_stuck(db, "run-1", 900)).reset == 2
    written, claimed = await complete_and_claim(db, [lost], 2, worker="w2")
    assert written == set()  # the zombie's answer is refused
    assert {i.id for i in claimed} == {lost.id, other.id}  # both are served again, to w2
    assert await db.fetchval("SELECT count(*) FROM analysis_results") == 0


async def test_an_empty_batch_is_a_plain_claim(db: asyncpg.Connection) -> None:
    await add_prompts(db, 3)
    await new_run(db)
    written, claimed = await complete_and_claim(db, [], 5)
    assert written == set() and len(claimed) == 3


async def test_a_plain_completion_claims_nothing(db: asyncpg.Connection) -> None:
    await add_prompts(db, 6)
    await new_run(db)
    held = await claim(db, 2)
    assert await items.complete(db, [Outcome(i, OK) for i in held]) == {i.id for i in held}
    assert await db.fetchval(
        "SELECT count(*) FROM analysis_queue WHERE status = 'processing'"
    ) == 0  # fmt: skip


async def test_the_claim_half_skips_the_targets_it_is_told_to(db: asyncpg.Connection) -> None:
    two = spec(targets=[{"name": "a", "provider": "echo", "model": "m"},
                        {"name": "b", "provider": "echo", "model": "m"}])  # fmt: skip
    await add_prompts(db, 3)
    await new_run(db, s=two)
    held = await items.claim(db, "run-1", worker="w1", limit=1, lease_seconds=60,
                             skip_targets=["b"])  # fmt: skip
    _, claimed = await items.complete_and_claim(
        db, [Outcome(i, OK) for i in held], "run-1", worker="w1", limit=10,
        lease_seconds=60, skip_targets=["b"],
    )  # fmt: skip
    assert [i.target for i in held + claimed] == ["a"] * 3  # b is left to batch_claim


async def test_an_answer_written_with_a_claim_breaks_the_fault_streak(
    db: asyncpg.Connection,
) -> None:
    await add_prompts(db, 4)
    await new_run(db)
    held = await claim(db, 1)
    await db.execute(
        "UPDATE run_targets SET fault = 'model gone', fault_streak = 2, fault_items = '{1}'"
    )
    written, claimed = await complete_and_claim(db, held, 1)
    assert written == {held[0].id} and len(claimed) == 1
    row = await db.fetchrow("SELECT fault, fault_streak, fault_items FROM run_targets")
    assert (row["fault"], row["fault_streak"], row["fault_items"]) == (None, 0, [])


async def test_the_worker_claims_with_its_writes(
    pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker draining 200 items in batches of 10 claims the freed slots in the statement
    that writes each batch: its claim loop's own claims are the first one, the batch it
    prefetches beside it, and the last, empty ones, not one per batch (the round trip per
    batch that the write now saves)."""
    async with pool.acquire() as db:
        await add_prompts(db, 200)
        await new_run(db, s=spec(batchSize=10))
        run = await runs.get_run(db, "run-1")
    plain_claims: list[int] = []
    real_claim = items.claim

    async def counted(*args: Any, **kw: Any) -> list[ClaimedItem]:
        got = await real_claim(*args, **kw)
        plain_claims.append(len(got))
        return got

    monkeypatch.setattr(items, "claim", counted)
    settings = Settings(database_url="unused", poll_seconds=0.05)
    stats = await Worker(pool, run, settings, name="w1", exit_when_done=True).run_until_stopped()
    assert stats.completed == stats.claimed == 200
    assert plain_claims[:2] == [10, 10] and len(plain_claims) <= 4, plain_claims
    async with pool.acquire() as db:
        assert await db.fetchval("SELECT count(DISTINCT queue_id) FROM analysis_results") == 200


async def test_the_server_keeps_the_plan_without_prepared_statements(
    db: asyncpg.Connection, db_url: str, pg_admin_url: str
) -> None:
    """Behind a pooler in transaction mode no prepared statement survives a transaction, so a
    statement sent as such was parsed and planned on every execution (3.6x the server CPU of
    a direct connection, docs/benchmarks.md). The function keeps its plan in the server
    connection: after a few batches the backend holds it, as a cached plan, between calls."""
    await add_prompts(db, 30)
    await new_run(db)
    # Straight to PostgreSQL (one backend to look into), as a transaction pooler's client does:
    # no statement cache, so nothing of the client's is kept in the backend.
    url = f"{pg_admin_url.rpartition('/')[0]}/{db_url.rpartition('/')[2]}"
    conn = await connect(url, pooler="transaction")
    try:
        held = await claim(conn, 2)
        for _ in range(6):
            _, held = await complete_and_claim(conn, held, 2)
        assert len(held) == 2
        # the pattern as an argument: in the text it would find this query's own plan
        kept = await conn.fetchval(
            "SELECT count(*) FROM pg_backend_memory_contexts"
            " WHERE name = 'CachedPlan' AND ident LIKE $1",
            "%WITH input AS (%unnest(p_ids, p_tokens%",
        )
    finally:
        await conn.close()
    assert kept == 1

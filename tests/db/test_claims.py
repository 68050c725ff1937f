"""Claims: batch, order, index use, no double claims, leases, fencing, release, rescue."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any

import asyncpg
import pytest

from analysisq.completion import Completion
from analysisq.errors import ErrorClass
from analysisq.queue import items, rescue, runs
from analysisq.queue.items import ClaimedItem, Outcome
from support import add_prompts, new_run, spec

pytestmark = pytest.mark.db

OK = Completion("answer", {"a": 1}, 10, 5, "echo-1", 12.5)


async def claim(
    db: asyncpg.Connection, n: int = 5, *, worker: str = "w1", lease: float = 60
) -> list[ClaimedItem]:
    return await items.claim(db, "run-1", worker=worker, limit=n, lease_seconds=lease)


async def test_claim_takes_a_batch_and_leases_it(db: asyncpg.Connection) -> None:
    await add_prompts(db, 12)
    await new_run(db)
    got = await claim(db)
    assert len(got) == 5
    assert all(i.attempt == 1 for i in got)
    rows = await db.fetch(
        "SELECT status, lease_owner, lease_expires_at > now() AS live, claim_token"
        " FROM analysis_queue WHERE id = ANY($1)",
        [i.id for i in got],
    )
    assert {(r["status"], r["lease_owner"], r["live"]) for r in rows} == {
        ("processing", "w1", True)
    }
    assert {r["claim_token"] for r in rows} == {i.token for i in got}


async def test_claim_serves_pending_before_due_retries(db: asyncpg.Connection) -> None:
    await add_prompts(db, 6)
    await new_run(db)
    first = await claim(db, 2)
    for i in first:
        assert await items.fail(db, i, ErrorClass.TRANSIENT, "timeout", 0.0)
    order = await claim(db, 6)
    statuses = [
        await db.fetchval("SELECT attempts FROM analysis_queue WHERE id = $1", i.id) for i in order
    ]
    # the four never-tried items come first, the two retries (second attempt) last
    assert statuses == [1, 1, 1, 1, 2, 2]


async def test_backoff_and_max_attempts_are_respected(db: asyncpg.Connection) -> None:
    await add_prompts(db, 2)
    await new_run(db)
    a, b = await claim(db, 2)
    assert await items.fail(db, a, ErrorClass.TRANSIENT, "later", 3600.0)
    assert await items.fail(db, b, ErrorClass.TRANSIENT, "now", 0.0)
    again = await claim(db, 5)
    assert [i.id for i in again] == [b.id]
    await db.execute(
        "UPDATE analysis_queue SET status = 'failed', attempts = 3, next_attempt_at = now(),"
        " lease_owner = NULL, lease_expires_at = NULL, claim_token = NULL,"
        " error_class = 'transient', error_message = 'x'"
    )
    assert await claim(db, 5) == []  # attempts exhausted


async def claim_plan(db: asyncpg.Connection) -> str:
    """The plan ``analysisq_complete_and_claim`` runs its statement with: the generic plan
    (the function forces it), made for no values in particular.

    The statement is taken from the function's body, prepared with the function's argument
    types and explained under ``plan_cache_mode = force_generic_plan``, so the arguments given
    (NULLs) play no part in it."""
    row = await db.fetchrow(
        "SELECT prosrc, proargnames, proargtypes::oid[]::regtype[]::text[] AS types, pronargs"
        " FROM pg_proc WHERE proname = 'analysisq_complete_and_claim'"
    )
    assert row is not None
    body = row["prosrc"].split("RETURN QUERY", 1)[1].rsplit(";", 1)[0]
    names = row["proargnames"][: row["pronargs"]]
    # longest names first: p_tokens must not eat the start of p_tokens_in
    for n, name in sorted(enumerate(names, 1), key=lambda x: -len(x[1])):
        body = body.replace(name, f"${n}")
    await db.execute(f"PREPARE claim_stmt ({', '.join(row['types'])}) AS {body}")
    try:
        await db.execute("SET plan_cache_mode = force_generic_plan")
        nulls = ", ".join(["NULL"] * row["pronargs"])
        return str(await db.fetchval(f"EXPLAIN (FORMAT JSON) EXECUTE claim_stmt ({nulls})"))
    finally:
        await db.execute("RESET plan_cache_mode")
        await db.execute("DEALLOCATE claim_stmt")


async def test_claim_uses_its_index(db: asyncpg.Connection) -> None:
    await add_prompts(db, 3000)
    await new_run(db)
    await db.execute("ANALYZE")
    await db.execute("SET enable_seqscan = off")  # the plan must not need a full scan
    text = await claim_plan(db)
    assert "analysis_queue_claim_idx" in text, text
    await db.execute("RESET enable_seqscan")
    plan = await claim_plan(db)
    assert "analysis_queue_claim_idx" in plan, plan
    # looking for a suspect reads only suspects, never every due item
    assert "analysis_queue_suspect_idx" in plan, plan


async def test_concurrent_claimers_never_share_an_item(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as db:
        await add_prompts(db, 600)
        await new_run(db)

    async def worker(name: str) -> list[int]:
        taken: list[int] = []
        async with pool.acquire() as db:
            while got := await claim(db, 7, worker=name):
                taken += [i.id for i in got]
        return taken

    results = await asyncio.gather(*(worker(f"w{n}") for n in range(6)))
    flat = [i for r in results for i in r]
    assert len(flat) == len(set(flat)) == 600
    assert sum(1 for r in results if r) >= 2  # really concurrent


async def test_complete_writes_one_result_and_is_fenced(db: asyncpg.Connection) -> None:
    await add_prompts(db, 3)
    await new_run(db)
    a, b, c = await claim(db, 3)
    forged = dataclasses.replace(c, token=a.token)
    written = await items.complete(db, [Outcome(a, OK), Outcome(b, OK), Outcome(forged, OK)])
    assert written == {a.id, b.id}
    assert await items.complete(db, [Outcome(a, OK)]) == set()  # a second write is refused
    rows = await db.fetch("SELECT queue_id, parsed, attempt FROM analysis_results")
    assert sorted(r["queue_id"] for r in rows) == sorted([a.id, b.id])
    assert json.loads(rows[0]["parsed"]) == {"a": 1}
    counts = await runs.counts(db, "run-1")
    assert (counts.completed, counts.processing) == (2, 1)


async def test_a_zombie_cannot_write_after_its_lease_was_reset(db: asyncpg.Connection) -> None:
    await add_prompts(db, 2)
    await new_run(db)
    zombie_a, zombie_b = await claim(db, 2, worker="zombie", lease=1)
    await db.execute("UPDATE analysis_queue SET lease_expires_at = now() - interval '1 second'")
    assert (await rescue.rescue_stuck(db, "run-1")).reset == 2
    fresh = await claim(db, 2, worker="alive")
    assert {i.id for i in fresh} == {zombie_a.id, zombie_b.id}
    # the zombie wakes up: every kind of write is refused
    assert await items.complete(db, [Outcome(zombie_a, OK)]) == set()
    assert not await items.fail(db, zombie_b, ErrorClass.PERMANENT, "late", None)
    assert not await items.release(db, zombie_a)
    assert await items.heartbeat(db, [zombie_a, zombie_b], 60) == set()
    # the living worker still owns both and completes them once
    assert await items.complete(db, [Outcome(i, OK) for i in fresh]) == {i.id for i in fresh}
    assert await db.fetchval("SELECT count(*) FROM analysis_results") == 2
    # the lost attempt was not counted: one answer, attempt 1
    assert [r[0] for r in await db.fetch("SELECT attempt FROM analysis_results")] == [1, 1]


async def test_heartbeat_extends_and_reports_lost(db: asyncpg.Connection) -> None:
    await add_prompts(db, 2)
    await new_run(db)
    a, b = await claim(db, 2, lease=5)
    await db.execute("UPDATE analysis_queue SET claim_token = gen_random_uuid() WHERE id = $1",
                     b.id)  # fmt: skip
    kept = await items.heartbeat(db, [a, b], 300)
    assert kept == {a.id}
    left = await db.fetchval(
        "SELECT extract(epoch FROM lease_expires_at - now()) FROM analysis_queue WHERE id = $1",
        a.id,
    )
    assert 290 < left <= 300


async def test_release_does_not_count_an_attempt(db: asyncpg.Connection) -> None:
    await add_prompts(db, 1)
    await new_run(db)
    (a,) = await claim(db, 1)
    assert await items.release(db, a, delay=0, deferral=True, error_class=ErrorClass.RATE_LIMITED,
                               message="429")  # fmt: skip
    row = await db.fetchrow("SELECT status, attempts, deferrals FROM analysis_queue")
    assert tuple(row) == ("pending", 0, 1)
    (again,) = await claim(db, 1)
    assert again.attempt == 1 and again.deferrals == 1


async def test_poison_item_fails_for_good_after_lease_losses(db: asyncpg.Connection) -> None:
    await add_prompts(db, 1)
    await new_run(db, s=spec(maxLeaseLosses=3))
    for n in range(3):
        (a,) = await claim(db, 1)
        assert a.attempt == 1  # lost attempts are not counted
        await db.execute("UPDATE analysis_queue SET lease_expires_at = now() - interval '1 s'")
        res = await rescue.rescue_stuck(db, "run-1")
        assert (res.reset, res.poisoned) == ((1, 0) if n < 2 else (0, 1))
    row = await db.fetchrow("SELECT status, error_class, next_attempt_at FROM analysis_queue")
    assert tuple(row) == ("failed", "poison", None)
    assert (await runs.counts(db, "run-1")).failed_for_good == 1
    assert await claim(db, 1) == []


async def test_paused_target_keeps_its_items_waiting(db: asyncpg.Connection) -> None:
    await add_prompts(db, 3)
    two = [{"name": "a", "provider": "echo", "model": "m"},
           {"name": "b", "provider": "echo", "model": "m"}]  # fmt: skip
    await new_run(db, s=spec(targets=two))
    assert await runs.pause_target(db, "run-1", "a", "401 from provider")
    assert not await runs.pause_target(db, "run-1", "a", "again")
    got = await claim(db, 10)
    assert {i.target for i in got} == {"b"} and len(got) == 3
    assert await runs.resume_targets(db, "run-1") == ["a"]
    assert {i.target for i in await claim(db, 10)} == {"a"}


async def test_rescued_items_are_claimed_before_the_backlog(db: asyncpg.Connection) -> None:
    await add_prompts(db, 50)
    await new_run(db)
    lost = await claim(db, 2, worker="dead")
    await db.execute("UPDATE analysis_queue SET lease_expires_at = now() - interval '1 second'"
                     " WHERE status = 'processing'")  # fmt: skip
    assert (await rescue.rescue_stuck(db, "run-1")).reset == 2
    assert {i.id for i in await claim(db, 2, worker="alive")} == {i.id for i in lost}


async def test_claim_never_scans_the_whole_queue(db: asyncpg.Connection) -> None:
    """No part of the claim reads analysis_queue in full: the claimed ids are looked up by key
    (a hash join against a scan of the whole table cost 30 ms at 10,000 rows, and grows)."""
    await add_prompts(db, 3000)
    await new_run(db)
    await db.execute("ANALYZE")
    plan = await claim_plan(db)

    def scans(node: dict[str, Any]) -> list[str]:
        own = [node["Node Type"]] if node.get("Relation Name") == "analysis_queue" else []
        return own + [t for child in node.get("Plans", []) for t in scans(child)]

    root = json.loads(plan)[0]["Plan"]
    assert "Seq Scan" not in scans(root), scans(root)


async def test_the_completion_finds_its_items_by_key(db: asyncpg.Connection) -> None:
    """The completion's UPDATE looks its items up by id, whatever the statistics said when
    the plan was made: reading every processing item instead (the status index) costs a
    batch as many rows as all workers together hold (200 workers x 10 = 2,000)."""
    await add_prompts(db, 3000)
    await new_run(db)
    for processing in (0, 2000):
        if processing:
            await claim(db, processing)
        await db.execute("ANALYZE")
        plan = json.loads(await claim_plan(db))[0]["Plan"]
        done = next(p for p in plan["Plans"] if p.get("Subplan Name") == "CTE changed")

        def reads(node: dict[str, Any]) -> set[str]:
            """The indexes the node reads (and "Seq Scan" for a full scan of the queue)."""
            full = node.get("Relation Name") == "analysis_queue" and node["Node Type"] == "Seq Scan"
            own = {node["Index Name"]} if "Index Name" in node else {"Seq Scan"} if full else set()
            return own.union(*(reads(child) for child in node.get("Plans", [])))

        assert reads(done) == {"analysis_queue_pkey"}, (processing, reads(done))


async def test_the_batch_writes_the_queue_in_one_update(db: asyncpg.Connection) -> None:
    """The answers and the claims of a batch are one UPDATE of analysis_queue (migration
    0012): each UPDATE node costs the server a setup per execution (the queue's indexes and
    its CHECK constraints compiled again), a tenth of its CPU per batch as a second node."""
    await add_prompts(db, 100)
    await new_run(db)
    await db.execute("ANALYZE")
    plan = json.loads(await claim_plan(db))[0]["Plan"]

    def writes(node: dict[str, Any]) -> list[str]:
        own = [node["Relation Name"]] if node["Node Type"] == "ModifyTable" else []
        return own + [t for child in node.get("Plans", []) for t in writes(child)]

    assert writes(plan).count("analysis_queue") == 1, writes(plan)

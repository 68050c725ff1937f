"""Faults users meet where they meet the other paths: provider batches, the stuck reset after
migration 0007, and bulk retry of a poisoned item.

Each test failed first, with its fix reverted: main's two-argument stuck reset; the old 0002
reset (which rescued items inside a provider batch); the batch claim trusting the caller's
maxAttempts; batch statuses and refusals written as the provider sent them; bulk retry
leaving ``lone_losses`` above the reset ``lease_losses`` (a CHECK violation)."""

from __future__ import annotations

import asyncpg
import pytest

from analysisq.queue import batches, rescue, retries, runs
from support import add_prompts, new_run, spec

pytestmark = pytest.mark.db

BATCH_TARGET = {
    "name": "b",
    "provider": "openai",
    "model": "m",
    "mode": "batch",
    "endpoint": "http://127.0.0.1:9/v1",
}


async def test_exactly_one_stuck_reset_remains_and_it_takes_live_tokens(
    db: asyncpg.Connection,
) -> None:
    rows = await db.fetch(
        "SELECT pg_get_function_identity_arguments(p.oid) AS args FROM pg_proc p"
        " WHERE p.proname = 'cleanup_stuck_queue_items'"
    )
    assert [r["args"] for r in rows] == [
        "p_run_id text, p_stuck_after interval, p_live_tokens uuid[]"
    ]
    # the seed's call and the runbook's two-argument call still run
    assert await db.fetchrow("SELECT * FROM cleanup_stuck_queue_items()") is not None
    assert await db.fetchrow(
        "SELECT * FROM cleanup_stuck_queue_items('run-1', interval '15 minutes')"
    )


async def test_the_stuck_reset_never_rescues_items_waiting_in_a_provider_batch(
    db: asyncpg.Connection,
) -> None:
    await add_prompts(db, 3)
    await new_run(db, "run-1", spec(targets=[BATCH_TARGET]))
    sub, claimed = await batches.claim(
        db, "run-1", "b", worker="dead", limit=3, lease_seconds=60, item_lease_seconds=360
    )
    assert sub is not None and len(claimed) == 3
    # the items' leases ran out (their owner died): the submission is adopted, not reset
    await db.execute("UPDATE analysis_queue SET lease_expires_at = now() - interval '1 minute'")
    res = await rescue.rescue_stuck(db, "run-1", 900)
    assert (res.reset, res.poisoned) == (0, 0)
    rows = await db.fetch("SELECT status, lease_losses, submission_id FROM analysis_queue")
    assert {(r["status"], r["lease_losses"], r["submission_id"]) for r in rows} == {
        ("processing", 0, sub)
    }


async def test_the_batch_claim_reads_max_attempts_from_the_database(
    db: asyncpg.Connection,
) -> None:
    """maxAttempts lowered to 1 while an item of a batch target waits with one attempt spent
    (released after a 429): the batch claim fails it for good instead of sending it again,
    and the item's decision later uses the database's maximum."""
    await add_prompts(db, 2)
    await new_run(db, "run-1", spec(targets=[BATCH_TARGET], maxAttempts=3))
    first = await db.fetchval("SELECT min(id) FROM analysis_queue")
    await db.execute(
        "UPDATE analysis_queue SET attempts = 1, error_class = 'rate_limited',"
        " error_message = '429 from provider' WHERE id = $1",
        first,
    )
    await runs.create_run(db, "run-1", spec(targets=[BATCH_TARGET], maxAttempts=1))
    sub, claimed = await batches.claim(
        db, "run-1", "b", worker="w", limit=10, lease_seconds=60, item_lease_seconds=360
    )
    assert sub is not None and [i.id for i in claimed] == [first + 1]
    assert claimed[0].max_attempts == 1
    row = await db.fetchrow(
        "SELECT status, next_attempt_at, error_message FROM analysis_queue WHERE id = $1", first
    )
    assert (row["status"], row["next_attempt_at"]) == ("failed", None)
    assert row["error_message"] == "gave up after 1 attempts: 429 from provider"
    (waiting,) = await batches.waiting_items(db, sub)
    assert waiting.max_attempts == 1


async def test_batch_texts_from_the_provider_are_made_storable(db: asyncpg.Connection) -> None:
    """A provider status or a refusal that carries half an emoji is stored repaired; asyncpg
    refused it and the submission could never be finished."""
    await add_prompts(db, 2)
    await new_run(db, "run-1", spec(targets=[BATCH_TARGET]))
    sub, _ = await batches.claim(
        db, "run-1", "b", worker="w", limit=2, lease_seconds=60, item_lease_seconds=360
    )
    assert sub is not None
    assert await batches.submitted(db, sub, worker="w", provider_batch_id="b_1", poll_in=60)
    assert await batches.polled(
        db, sub, worker="w", status="in_progress \ud83d", counts={"total": 2}, poll_in=60
    )
    finished = await batches.finish(
        db, sub, worker="w", outcome="refused: bad \ud83d\x00", reason="gateway said \ud83d"
    )
    assert finished.released == 2
    row = await db.fetchrow(
        "SELECT provider_status, outcome FROM batch_submissions WHERE id = $1", sub
    )
    assert (row["provider_status"], row["outcome"]) == (
        "in_progress \ufffd",
        "refused: bad \ufffd\ufffd",
    )
    messages = await db.fetch("SELECT DISTINCT error_message FROM analysis_queue")
    assert [m["error_message"] for m in messages] == ["gateway said \ufffd"]


async def test_a_poisoned_item_can_be_retried(db: asyncpg.Connection) -> None:
    """Bulk retry resets the lease losses; the ones that pointed at the item go with them."""
    await add_prompts(db, 1)
    await new_run(db)
    await db.execute(
        "UPDATE analysis_queue SET status = 'failed', next_attempt_at = NULL, lease_losses = 3,"
        " lone_losses = 3, error_class = 'poison', error_message = 'poison: lease lost 3 times'"
    )
    assert await retries.retry_failed(db, "run-1") == 1
    row = await db.fetchrow("SELECT status, lease_losses, lone_losses FROM analysis_queue")
    assert (row["status"], row["lease_losses"], row["lone_losses"]) == ("pending", 0, 0)

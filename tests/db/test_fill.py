"""Fill: one idempotent statement; exactly one item per (run, prompt, target)."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

from analysisq.db.migrate import known_migrations
from analysisq.queue import runs
from support import add_prompts, spec

pytestmark = pytest.mark.db

TWO_TARGETS = [
    {"name": "a", "provider": "echo", "model": "m"},
    {"name": "b", "provider": "echo", "model": "m"},
]


async def _items(db: asyncpg.Connection) -> list[tuple[str, int, str]]:
    rows = await db.fetch("SELECT run_id, prompt_tracking_id, target FROM analysis_queue")
    return [tuple(r) for r in rows]  # type: ignore[misc]


async def test_fill_is_prompts_times_targets_and_idempotent(db: asyncpg.Connection) -> None:
    await add_prompts(db, 50)
    s = spec(targets=TWO_TARGETS)
    await runs.create_run(db, "r", s)
    first = await runs.fill(db, "r", s)
    second = await runs.fill(db, "r", s)
    assert (first.inserted, second.inserted) == (100, 0)
    got = await _items(db)
    assert len(got) == len(set(got)) == 100
    assert (await runs.counts(db, "r")).pending == 100


async def test_selection_by_tags_ids_and_active(db: asyncpg.Connection) -> None:
    await add_prompts(db, 5, prefix="red", tags=["red", "x"])
    await add_prompts(db, 3, prefix="blue", tags=["blue"])
    await add_prompts(db, 2, prefix="off", tags=["red"], active=False)
    by_tag = spec(prompts={"tags": ["red"]})
    await runs.create_run(db, "t", by_tag)
    assert (await runs.fill(db, "t", by_tag)).inserted == 5  # inactive excluded
    by_id = spec(prompts={"ids": ["blue000001", "off000000", "nope"]})
    await runs.create_run(db, "i", by_id)
    res = await runs.fill(db, "i", by_id)
    assert res.inserted == 2  # explicit ids include inactive prompts
    assert res.missing_ids == ["nope"]
    everything = spec()
    await runs.create_run(db, "all", everything)
    assert (await runs.fill(db, "all", everything)).inserted == 8


async def _backend_waiting_in_fill(db: asyncpg.Connection) -> int:
    """The pid of the backend whose fill waits on a lock (behind a pooler the client's
    get_server_pid() is the pooler's, not the backend's)."""
    for _ in range(1000):
        pid = await db.fetchval(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock' AND query LIKE '%analysisq_fill_run%'"
        )
        if pid is not None:
            return int(pid)
        await asyncio.sleep(0.01)
    raise AssertionError("the fill never reached the locked row")


async def _hold_last_row(conn: asyncpg.Connection, run_id: str) -> None:
    """Insert, uncommitted, the fill's last row (the last prompt x target b): the fill inserts
    every row before it, then waits on the unique index for this transaction."""
    await conn.execute(
        "INSERT INTO analysis_queue (run_id, prompt_tracking_id, target)"
        " SELECT $1, max(id), 'b' FROM prompts",
        run_id,
    )


async def test_fill_killed_half_way_then_repeated(
    db: asyncpg.Connection, db_url: str, client_options: dict[str, Any]
) -> None:
    """A fill whose backend dies mid-statement leaves nothing half-done behind it.

    An open transaction holding the fill's last row stops the fill there (the unique index
    waits for it) with every other row already inserted; then the fill's backend is killed
    and the blocker rolled back.
    """
    await add_prompts(db, 2_000)
    s = spec(targets=TWO_TARGETS)
    await runs.create_run(db, "k", s)
    blocker = await asyncpg.connect(db_url, **client_options)
    victim = await asyncpg.connect(db_url, **client_options)
    try:
        tx = blocker.transaction()
        await tx.start()
        await _hold_last_row(blocker, "k")
        fill = asyncio.create_task(runs.fill(victim, "k", s))
        await db.execute("SELECT pg_terminate_backend($1)", await _backend_waiting_in_fill(db))
        with pytest.raises(Exception):  # noqa: B017 - any error: the connection is gone
            await fill
        await tx.rollback()
    finally:
        victim.terminate()
        await blocker.close()
    assert await db.fetchval("SELECT count(*) FROM analysis_queue") == 0
    assert (await runs.fill(db, "k", s)).inserted == 4_000
    assert (await runs.fill(db, "k", s)).inserted == 0
    got = await _items(db)
    assert len(got) == len(set(got)) == 4_000


@pytest.mark.parametrize("ending", ["commit", "rollback"])
async def test_two_fills_at_once_add_exactly_what_is_missing(
    db: asyncpg.Connection, db_url: str, client_options: dict[str, Any], ending: str
) -> None:
    """A fill that meets another transaction's uncommitted rows of the run waits for it: if
    that one commits, the plain INSERT fails on the unique index and is redone with ON
    CONFLICT (adding only the rows the other did not); if it rolls back, the INSERT goes on."""
    await add_prompts(db, 300)
    s = spec(targets=TWO_TARGETS)
    await runs.create_run(db, "c", s)
    other = await asyncpg.connect(db_url, **client_options)
    second = await asyncpg.connect(db_url, **client_options)
    try:
        tx = other.transaction()
        await tx.start()
        first = await runs.fill(other, "c", spec(targets=TWO_TARGETS[:1]))  # target a only
        await _hold_last_row(other, "c")
        fill = asyncio.create_task(runs.fill(second, "c", s))
        await _backend_waiting_in_fill(db)
        await (tx.commit() if ending == "commit" else tx.rollback())
        added = (await fill).inserted
    finally:
        await other.close()
        await second.close()
    assert first.inserted == 300
    assert added == (299 if ending == "commit" else 600)
    got = await _items(db)
    assert len(got) == len(set(got)) == 600
    assert (await runs.fill(db, "c", s)).inserted == 0


async def _refs_lock_calls(db: asyncpg.Connection) -> int:
    """How often this backend took the prompts' lock and has not yet reported it (the counts
    are reported between transactions, never inside one: a difference within a transaction
    is exact): once by the fill, once more by the reference check of each INSERT it does not
    skip."""
    return int(
        await db.fetchval(
            "SELECT coalesce(pg_stat_get_xact_function_calls("
            "'analysisq_prompt_refs_lock(boolean)'::regprocedure), 0)"
        )
    )


async def test_the_fill_skips_the_reference_check_only_for_itself(
    db: asyncpg.Connection,
) -> None:
    """The fill's rows come from prompts under the prompts' lock: the statement-level check is
    skipped for them (the call stack proves it) and runs for anything else, including a fill
    at REPEATABLE READ and text that imitates the fill's call stack."""
    await db.execute("SET track_functions = 'all'")
    await add_prompts(db, 20)
    s = spec(targets=TWO_TARGETS)
    await runs.create_run(db, "f", s)
    async with db.transaction():
        before = await _refs_lock_calls(db)
        assert (await runs.fill(db, "f", s)).inserted == 40
        assert await _refs_lock_calls(db) - before == 1  # the fill's own lock; no check
    await db.execute("DELETE FROM analysis_queue")
    async with db.transaction():
        before = await _refs_lock_calls(db)
        await db.execute(
            "INSERT INTO analysis_queue (run_id, prompt_tracking_id, target)"
            " SELECT 'f', id, 'a' FROM prompts"
        )
        assert await _refs_lock_calls(db) - before == 1  # a client's INSERT is checked
    async with db.transaction(isolation="repeatable_read"):
        before = await _refs_lock_calls(db)
        assert (await runs.fill(db, "f", s)).inserted == 20
        assert await _refs_lock_calls(db) - before == 0  # checked with row locks instead
    # a statement whose text holds the fill's frame, and a bad INSERT right after a real fill
    fake = "PL/pgSQL function analysisq_fill_run(text,text[],text[],text[]) line 1 at SQL statement"
    bad = (
        "INSERT INTO analysis_queue (run_id, prompt_tracking_id, target) VALUES ('f', 999999, 'a')"
    )
    for forged in (
        f'DO $$ BEGIN EXECUTE $q${bad} /* "\n{fake}\n*/$q$; END $$',
        f"DO $$ BEGIN PERFORM analysisq_fill_run('f', '{{a}}', '{{}}', '{{}}'); {bad}; END $$",
    ):
        with pytest.raises(asyncpg.ForeignKeyViolationError, match="prompt id 999999"):
            await db.execute(forged)


async def test_the_migration_on_a_filled_database(db: asyncpg.Connection) -> None:
    """0013 on a database holding a run filled by the INSERT of before: no row lost or
    changed, the re-fill adds nothing, a target added later gets exactly its rows."""
    await db.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public;")
    for m in known_migrations():
        if m.version < 13:
            await db.execute(m.sql)
    await add_prompts(db, 40)
    one = spec(targets=TWO_TARGETS[:1])
    await runs.create_run(db, "m", one)
    await db.execute(
        "INSERT INTO analysis_queue (run_id, prompt_tracking_id, target)"
        " SELECT 'm', id, 'a' FROM prompts ORDER BY id ON CONFLICT DO NOTHING"
    )
    before = await db.fetch("SELECT * FROM analysis_queue ORDER BY id")
    (m13,) = [m for m in known_migrations() if m.version == 13]
    await db.execute(m13.sql)
    assert await db.fetch("SELECT * FROM analysis_queue ORDER BY id") == before
    assert (await runs.fill(db, "m", one)).inserted == 0
    both = spec(targets=TWO_TARGETS)
    await runs.create_run(db, "m", both)
    assert (await runs.fill(db, "m", both)).inserted == 40
    got = await _items(db)
    assert len(got) == len(set(got)) == 80

"""The queue's references to its prompt and run target (migration 0011's triggers).

They replaced two foreign keys (one RI trigger call per inserted row each) with checks once
per statement; every guarantee the foreign keys gave is proven here: a row with a missing
parent is refused, a referenced prompt cannot be deleted, re-keyed or truncated away, a
deleted run target takes its items with it, and so under concurrency as well.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

from analysisq.db.migrate import known_migrations
from analysisq.db.sql import query
from analysisq.queue import runs
from support import add_prompts, new_run, spec

pytestmark = pytest.mark.db

TWO_TARGETS = [
    {"name": "a", "provider": "echo", "model": "m"},
    {"name": "b", "provider": "echo", "model": "m"},
]
INSERT = "INSERT INTO analysis_queue (run_id, prompt_tracking_id, target) VALUES ($1, $2, $3)"


async def _filled(db: asyncpg.Connection, n: int = 3) -> list[int]:
    """Run 'r' with targets a and b over *n* prompts, filled; the prompts' ids."""
    await add_prompts(db, n)
    await new_run(db, "r", spec(targets=TWO_TARGETS))
    return [r["id"] for r in await db.fetch("SELECT id FROM prompts ORDER BY id")]


async def _queue(db: asyncpg.Connection) -> int:
    return int(await db.fetchval("SELECT count(*) FROM analysis_queue"))


async def test_an_item_of_a_missing_prompt_is_refused(db: asyncpg.Connection) -> None:
    ids = await _filled(db)
    with pytest.raises(asyncpg.ForeignKeyViolationError, match="prompt id 999999 does not") as e:
        await db.execute(INSERT, "r", 999_999, "a")
    assert e.value.constraint_name == "analysis_queue_prompt_tracking_id_fkey"
    # one bad row among good ones: the whole statement fails, nothing of it stays
    await db.execute("DELETE FROM analysis_queue WHERE target = 'a'")
    with pytest.raises(asyncpg.ForeignKeyViolationError, match="prompt id 999999"):
        await db.execute(
            "INSERT INTO analysis_queue (run_id, prompt_tracking_id, target)"
            " SELECT 'r', unnest($1::bigint[]), 'a' ON CONFLICT DO NOTHING",
            [*ids, 999_999],
        )
    assert await _queue(db) == 3


async def test_an_item_of_a_missing_run_target_is_refused(db: asyncpg.Connection) -> None:
    ids = await _filled(db)
    with pytest.raises(asyncpg.ForeignKeyViolationError, match="run r has no target c") as e:
        await db.execute(INSERT, "r", ids[0], "c")
    assert e.value.constraint_name == "analysis_queue_run_id_target_fkey"
    with pytest.raises(asyncpg.ForeignKeyViolationError, match="run nope has no target a"):
        await db.execute(INSERT, "nope", ids[0], "a")
    assert await _queue(db) == 6


async def test_an_update_to_a_missing_parent_is_refused(db: asyncpg.Connection) -> None:
    await _filled(db)
    item = await db.fetchval("SELECT min(id) FROM analysis_queue")
    with pytest.raises(asyncpg.ForeignKeyViolationError, match="prompt id 999999"):
        await db.execute(
            "UPDATE analysis_queue SET prompt_tracking_id = 999999 WHERE id = $1", item
        )
    with pytest.raises(asyncpg.ForeignKeyViolationError, match="run r has no target zz"):
        await db.execute("UPDATE analysis_queue SET target = 'zz' WHERE id = $1", item)


async def test_a_referenced_prompt_cannot_be_deleted(db: asyncpg.Connection) -> None:
    await _filled(db)
    with pytest.raises(
        asyncpg.ForeignKeyViolationError, match=r"prompt p000001 .* is still in the queue"
    ) as e:
        await db.execute("DELETE FROM prompts WHERE external_id = 'p000001'")
    assert e.value.constraint_name == "analysis_queue_prompt_tracking_id_fkey"
    with pytest.raises(asyncpg.ForeignKeyViolationError, match="is still in the queue"):
        await db.execute("UPDATE prompts SET id = DEFAULT WHERE external_id = 'p000002'")
    with pytest.raises(asyncpg.ForeignKeyViolationError, match="truncate prompts"):
        await db.execute("TRUNCATE prompts CASCADE")
    assert await db.fetchval("SELECT count(*) FROM prompts") == 3
    # a prompt no run uses may go; so may all of them with the queue in the same statement
    await add_prompts(db, 1, prefix="unused")
    assert await db.execute("DELETE FROM prompts WHERE external_id LIKE 'unused%'") == "DELETE 1"
    await db.execute("TRUNCATE prompts, analysis_queue")


async def test_a_deleted_run_target_takes_its_items(db: asyncpg.Connection) -> None:
    await _filled(db)
    await add_prompts(db, 2, prefix="o")
    await new_run(db, "other", spec(targets=TWO_TARGETS))
    await db.execute("DELETE FROM run_targets WHERE run_id = 'r' AND target = 'a'")
    left = await db.fetch("SELECT run_id, target, count(*) FROM analysis_queue GROUP BY 1, 2")
    assert sorted(map(tuple, left)) == [("other", "a", 5), ("other", "b", 5), ("r", "b", 3)]
    # deleting the run cascades to its targets and from them to the items
    await runs.delete_run(db, "r")
    assert await db.fetchval("SELECT count(*) FROM analysis_queue WHERE run_id = 'r'") == 0
    assert await _queue(db) == 10


async def test_a_referenced_run_target_cannot_be_rekeyed_or_truncated(
    db: asyncpg.Connection,
) -> None:
    await _filled(db)
    with pytest.raises(asyncpg.ForeignKeyViolationError, match="target a of run r still has"):
        await db.execute("UPDATE run_targets SET target = 'c' WHERE target = 'a'")
    # TRUNCATE run_targets takes the queue with it (CASCADE, through batch_submissions) or fails
    with pytest.raises(asyncpg.FeatureNotSupportedError, match="analysis_queue"):
        await db.execute("TRUNCATE run_targets, batch_submissions")
    assert await db.fetchval("SELECT count(*) FROM run_targets WHERE run_id = 'r'") == 2


async def test_parents_are_guarded_only_at_read_committed(db: asyncpg.Connection) -> None:
    """At a higher isolation level the guards could not see rows committed after the
    transaction's snapshot: they refuse rather than risk an orphan."""
    await _filled(db)
    await add_prompts(db, 1, prefix="unused")
    for stmt in (
        "DELETE FROM prompts WHERE external_id = 'unused000000'",
        "DELETE FROM run_targets WHERE target = 'a'",
    ):
        async with db.transaction(isolation="repeatable_read"):
            with pytest.raises(asyncpg.FeatureNotSupportedError, match="needs READ COMMITTED"):
                await db.execute(stmt)


async def _blocked_on_lock(db: asyncpg.Connection, like: str) -> None:
    """Until a backend waits on a lock running a statement LIKE *like*."""
    for _ in range(1000):
        if await db.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock' AND query LIKE $1",
            like,
        ):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"no statement {like!r} waited on a lock")


async def _delete_during_open_fill(
    db: asyncpg.Connection, db_url: str, client_options: dict[str, Any], delete: str
) -> str:
    """Fill run r (5 prompts x 2 targets) in an open transaction, start *delete* on another
    connection, see it wait for the fill, commit the fill: the delete's outcome."""
    await add_prompts(db, 5)
    s = spec(targets=TWO_TARGETS)
    await runs.create_run(db, "r", s)
    filler = await asyncpg.connect(db_url, **client_options)
    deleter = await asyncpg.connect(db_url, **client_options)
    try:
        tx = filler.transaction()
        await tx.start()
        assert (await runs.fill(filler, "r", s)).inserted == 10
        task = asyncio.create_task(deleter.execute(delete))
        await _blocked_on_lock(db, delete.split(" WHERE")[0] + "%")
        await tx.commit()
        return str(await task)
    finally:
        await filler.close()
        await deleter.close()


async def test_a_prompt_deleted_while_a_fill_is_open_is_refused(
    db: asyncpg.Connection, db_url: str, client_options: dict[str, Any]
) -> None:
    """The open fill holds the prompts' lock: a delete waits for its commit and then sees its
    items (the race a check without the lock would lose)."""
    with pytest.raises(asyncpg.ForeignKeyViolationError, match="p000003"):
        await _delete_during_open_fill(
            db, db_url, client_options, "DELETE FROM prompts WHERE external_id = 'p000003'"
        )
    assert await db.fetchval("SELECT count(*) FROM prompts") == 5


async def test_a_fill_after_an_uncommitted_delete_is_refused(
    db: asyncpg.Connection, db_url: str, client_options: dict[str, Any]
) -> None:
    """The other order: the fill waits for the delete's commit and then finds the prompt gone."""
    await add_prompts(db, 5)
    deleter = await asyncpg.connect(db_url, **client_options)
    watcher = await asyncpg.connect(db_url, **client_options)
    try:
        tx = deleter.transaction()
        await tx.start()
        pid = await db.fetchval("SELECT id FROM prompts WHERE external_id = 'p000003'")
        await deleter.execute("DELETE FROM prompts WHERE id = $1", pid)
        s = spec(targets=TWO_TARGETS)
        await runs.create_run(db, "r", s)
        # the fill's own statement no longer sees the prompt only once the delete commits:
        # insert the id directly, as a fill that read it before the delete would
        insert = asyncio.create_task(db.execute(INSERT, "r", pid, "a"))
        await _blocked_on_lock(watcher, "INSERT INTO analysis_queue%")
        await tx.commit()
        with pytest.raises(asyncpg.ForeignKeyViolationError, match=f"prompt id {pid} does not"):
            await insert
    finally:
        await deleter.close()
        await watcher.close()
    assert await _queue(db) == 0


async def test_a_run_target_deleted_while_a_fill_is_open_takes_its_items(
    db: asyncpg.Connection, db_url: str, client_options: dict[str, Any]
) -> None:
    """Deleting a target waits for an open fill of it and then deletes what it inserted."""
    delete = "DELETE FROM run_targets WHERE run_id = 'r' AND target = 'a'"
    assert await _delete_during_open_fill(db, db_url, client_options, delete) == "DELETE 1"
    assert await db.fetchval("SELECT count(*) FROM analysis_queue WHERE target = 'a'") == 0
    assert await _queue(db) == 5


async def test_the_migration_keeps_existing_rows_and_guards_them(db: asyncpg.Connection) -> None:
    """0011 on a database that already holds a filled run: no row lost, no table rewritten,
    the old rows guarded like new ones, the narrower status index built."""
    await db.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public;")
    later = [m for m in known_migrations() if m.version >= 11]
    for m in known_migrations():
        if m.version < 11:
            await db.execute(m.sql)
    # filled as the fill of that schema did (the fill function came with 0013)
    await add_prompts(db, 50)
    await runs.create_run(db, "r", spec(targets=TWO_TARGETS))
    await db.execute(
        "INSERT INTO analysis_queue (run_id, prompt_tracking_id, target)"
        " SELECT 'r', p.id, t FROM prompts p, unnest('{a,b}'::text[]) t"
    )
    ids = [r["id"] for r in await db.fetch("SELECT id FROM prompts ORDER BY id")]
    await db.execute(
        "UPDATE analysis_queue SET status = 'failed', error_class = 'permanent',"
        " error_message = 'no', next_attempt_at = NULL WHERE prompt_tracking_id = $1",
        ids[0],
    )
    before = await db.fetch("SELECT * FROM analysis_queue ORDER BY id")
    node = await db.fetchval("SELECT relfilenode FROM pg_class WHERE relname = 'analysis_queue'")
    assert later[0].version == 11
    await db.execute(later[0].sql)
    assert await db.fetch("SELECT * FROM analysis_queue ORDER BY id") == before
    assert node == await db.fetchval(
        "SELECT relfilenode FROM pg_class WHERE relname = 'analysis_queue'"
    )
    assert not await db.fetchval(
        "SELECT count(*) FROM pg_constraint WHERE conrelid = 'analysis_queue'::regclass"
        " AND conname IN ('analysis_queue_prompt_tracking_id_fkey',"
        " 'analysis_queue_run_id_target_fkey')"
    )
    with pytest.raises(asyncpg.ForeignKeyViolationError, match="p000000"):
        await db.execute("DELETE FROM prompts WHERE id = $1", ids[0])
    failed = query("failed_items")
    args = failed.args(run_id=None, limit=20)
    await db.execute("SET enable_seqscan = off")
    plan = "\n".join(r[0] for r in await db.fetch("EXPLAIN " + failed.text, *args))
    assert "analysis_queue_status_idx" in plan, plan
    assert len(await db.fetch(failed.text, *args)) == 2


async def test_a_fill_at_repeatable_read_locks_the_prompts(
    db: asyncpg.Connection, db_url: str, client_options: dict[str, Any]
) -> None:
    """A snapshot older than a prompt's delete still shows the prompt: at REPEATABLE READ the
    check locks the prompts instead (a serialization failure), as the RI check did."""
    ids = await _filled(db)
    await add_prompts(db, 1, prefix="late")
    late = await db.fetchval("SELECT id FROM prompts WHERE external_id = 'late000000'")
    other = await asyncpg.connect(db_url, **client_options)
    try:
        async with db.transaction(isolation="repeatable_read"):
            assert await db.fetchval("SELECT count(*) FROM prompts") == 4  # the snapshot
            await other.execute("DELETE FROM prompts WHERE id = $1", late)
            with pytest.raises(asyncpg.SerializationError, match="could not serialize"):
                await db.execute(INSERT, "r", late, "a")
        async with db.transaction(isolation="repeatable_read"):
            with pytest.raises(asyncpg.ForeignKeyViolationError, match="prompt id 999999"):
                await db.execute(INSERT, "r", 999_999, "a")
        async with db.transaction(isolation="repeatable_read"):
            await db.execute("DELETE FROM analysis_queue WHERE prompt_tracking_id = $1", ids[0])
            assert (await runs.fill(db, "r", spec(targets=TWO_TARGETS))).inserted == 2
    finally:
        await other.close()

"""Fill: one idempotent statement; exactly one item per (run, prompt, target)."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

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


async def test_fill_killed_half_way_then_repeated(
    db: asyncpg.Connection, db_url: str, client_options: dict[str, Any]
) -> None:
    """A fill whose backend dies mid-statement leaves nothing half-done behind it.

    An open delete of the last prompt stops the fill after its last row (the statement's
    check of the prompts waits for the deleting transaction, migration 0011) with every row
    already inserted; then the fill's backend is killed and the delete rolled back.
    """
    await add_prompts(db, 2_000)
    s = spec(targets=TWO_TARGETS)
    await runs.create_run(db, "k", s)
    blocker = await asyncpg.connect(db_url, **client_options)
    victim = await asyncpg.connect(db_url, **client_options)
    try:
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute("DELETE FROM prompts WHERE id = (SELECT max(id) FROM prompts)")
        fill = asyncio.create_task(runs.fill(victim, "k", s))
        # The fill's backend, found by what it waits on (behind a pooler the client's
        # get_server_pid() is the pooler's, not the backend's).
        for _ in range(500):
            pid = await db.fetchval(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock' AND query LIKE '%INSERT INTO analysis_queue%'"
            )
            if pid is not None:
                break
            await asyncio.sleep(0.01)
        assert pid is not None, "the fill never reached the locked row"
        await db.execute("SELECT pg_terminate_backend($1)", pid)
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

"""Resuming a paused target: nothing parked before, during or after the resume is stranded."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

from analysisq.errors import ErrorClass
from analysisq.queue import items, runs
from support import add_prompts, new_run

pytestmark = pytest.mark.db


async def test_a_release_that_parks_after_a_resume_does_not_strand_it(
    db: asyncpg.Connection,
) -> None:
    """A worker got a 401 with the old key, the target was resumed meanwhile, and only then
    does its release (park=True) arrive: the item must stay claimable, not wait forever."""
    await add_prompts(db, 2)
    await new_run(db)
    late, other = await items.claim(db, "run-1", worker="old-pod", limit=2, lease_seconds=60)
    assert await runs.pause_target(db, "run-1", "echo", "HTTP 401: bad key")
    assert await items.release(db, other, error_class=ErrorClass.AUTH, message="401", park=True)
    assert await runs.resume_targets(db, "run-1") == ["echo"]
    assert await items.release(db, late, error_class=ErrorClass.AUTH, message="401", park=True)
    due = await items.claim(db, "run-1", worker="new", limit=5, lease_seconds=60)
    assert {i.id for i in due} == {late.id, other.id}


async def test_a_resume_waits_for_a_release_under_way(
    db_url: str, client_options: dict[str, Any]
) -> None:
    """The release's transaction sees the target paused and parks; the resume that runs
    meanwhile must wait for it and then unpark the item, not miss it."""
    a = await asyncpg.connect(db_url, **client_options)
    b = await asyncpg.connect(db_url, **client_options)
    try:
        await add_prompts(a, 1)
        await new_run(a)
        (item,) = await items.claim(a, "run-1", worker="old-pod", limit=1, lease_seconds=60)
        assert await runs.pause_target(a, "run-1", "echo", "HTTP 401: bad key")
        tx = a.transaction()
        await tx.start()
        assert await items.release(a, item, error_class=ErrorClass.AUTH, message="x", park=True)
        resume = asyncio.create_task(runs.resume_targets(b, "run-1"))
        await asyncio.sleep(0.5)
        assert not resume.done()  # it waits for the release's lock on the target
        await tx.commit()
        assert await resume == ["echo"]
        due = await items.claim(a, "run-1", worker="new", limit=5, lease_seconds=60)
        assert [i.id for i in due] == [item.id]
    finally:
        await a.close()
        await b.close()

"""The submit side of batch mode at a good rate: the next page of prompts is read while one
is encoded, and what did not fit the batch goes back in one statement. Both are shown by
what the sender asks of the database (its calls, spied on and passed through), not by time."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import asyncpg
import httpx
import pytest
from test_batch_driver import check_invariants, driver, http, target, until_done

from analysisq.db import sql
from analysisq.fake_provider import FakeConfig, FakeProvider
from analysisq.queue import batches, runs
from analysisq.queue.items import ClaimedItem
from analysisq.worker import batch_plan, batch_send
from support import add_prompts, new_run, spec

pytestmark = [pytest.mark.db, pytest.mark.timeout(240)]

__all__ = ["http"]  # the fixture, shared with test_batch_driver


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_the_next_page_is_read_while_one_is_encoded(
    db: asyncpg.Connection,
    pool: asyncpg.Pool,
    http: httpx.AsyncClient,
    provider: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A submission of three pages: each page after the first is asked for before the page
    before it has been added whole (read one, then encode it, as before, asked for it after),
    and every item is answered once."""
    monkeypatch.setattr(batch_send, "PAGE_ITEMS", 100)
    events: list[tuple[str, int]] = []
    real_page = batches.prompt_page
    real_add = batch_plan.Plan.add

    async def page(conn: asyncpg.Connection, sub: int, ids: Sequence[int], **kw: Any) -> Any:
        events.append(("read", ids[0]))
        return await real_page(conn, sub, ids, **kw)

    def add(plan: batch_plan.Plan, item: ClaimedItem, text: str) -> None:
        events.append(("add", item.id))
        real_add(plan, item, text)

    monkeypatch.setattr(batches, "prompt_page", page)
    monkeypatch.setattr(batch_plan.Plan, "add", add)
    async with FakeProvider(FakeConfig(batch_seconds=0.2)) as fake:
        await add_prompts(db, 300)
        await new_run(db, "run-1", spec(targets=[target(fake, provider)]))
        run = await runs.get_run(db, "run-1")
        await until_done(pool, [driver(pool, run, http, "w1")])
        stats = fake.stats()
    counts = await check_invariants(db)
    assert counts.completed == 300 and stats.prompts_completed_more_than_once == 0
    reads = [i for i, (kind, _) in enumerate(events) if kind == "read"]
    assert len(reads) == 3, events[:5]
    adds = [i for i, (kind, _) in enumerate(events) if kind == "add"]
    assert len(adds) == 300
    for n, read in enumerate(reads[1:], 1):
        last_add_of_page_before = adds[100 * n - 1]
        assert read < last_add_of_page_before, (n, read, last_add_of_page_before)


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_what_did_not_fit_goes_back_in_one_statement(
    db: asyncpg.Connection,
    pool: asyncpg.Pool,
    http: httpx.AsyncClient,
    provider: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """600 items claimed, hundreds of them past ``maxBytes``: sending the batch takes a handful
    of statements (was one more per item that did not fit), and the items that did not fit
    are waiting again, unspent (no attempt counted) and free of the submission."""
    calls: Counter[str] = Counter()
    for name in ("fetch", "fetchrow", "fetchval", "execute"):
        real = getattr(sql, name)

        def spy(conn: Any, block: str, /, _real: Any = real, **values: object) -> Any:
            calls[block] += 1
            return _real(conn, block, **values)

        monkeypatch.setattr(sql, name, spy)
    async with FakeProvider(FakeConfig(batch_seconds=0.2)) as fake:
        await add_prompts(db, 600)
        await new_run(db, "run-1", spec(targets=[target(fake, provider, maxBytes=60_000)]))
        run = await runs.get_run(db, "run-1")
        sender = driver(pool, run, http, "w1").sender
        calls.clear()
        assert await sender.claim_and_send(run.spec.targets[0])
    back = await db.fetch(
        "SELECT attempts, submission_id, claim_token FROM analysis_queue WHERE status = 'pending'"
    )
    assert len(back) > 200  # many did not fit
    assert all(r["attempts"] == 0 and r["submission_id"] is None for r in back)
    assert all(r["claim_token"] is None for r in back)
    sent = await db.fetchval("SELECT count(*) FROM analysis_queue WHERE status = 'processing'")
    assert sent + len(back) == 600
    assert sum(calls.values()) < 10, calls

"""The batch discount: an answer through a provider batch costs ``1 - batchDiscount`` of the
price, wherever cost is shown or spent (usage, export, dashboard, budgets)."""

from __future__ import annotations

import asyncio
import io
import json

import asyncpg
import pytest

from analysisq.completion import Completion
from analysisq.local.export import write_results
from analysisq.queue import budget, dashboard, items, usage
from analysisq.queue.items import Outcome
from analysisq.tokens import TokenEstimate
from support import add_prompts, new_run, spec

pytestmark = pytest.mark.db

#: 1 per million in, 3 per million out: 1,000 tokens in + 1,000 out cost 0.004 in full.
PRICES = {"inputPerMillionTokens": 1, "outputPerMillionTokens": 3, "batchDiscount": 0.25}


def priced(name: str, **kw: object) -> dict[str, object]:
    return {"name": name, "provider": "echo", "model": "m", "pricing": PRICES, **kw}


async def answer_all(db: asyncpg.Connection, *, via_batch: set[str]) -> None:
    """Answer every item with 1,000 tokens in and out; targets in *via_batch* as if through
    a provider batch."""
    claimed = await items.claim(db, "run-1", worker="w", limit=100, lease_seconds=60)
    for target in {i.target for i in claimed}:
        done = [
            Outcome(i, Completion("ok", None, 1000, 1000, "m", 1.0))
            for i in claimed
            if i.target == target
        ]
        await items.complete(db, done, via_batch=target in via_batch)


async def test_answers_through_a_batch_cost_the_discounted_price(db: asyncpg.Connection) -> None:
    await add_prompts(db, 4)
    await new_run(db, "run-1", spec(targets=[priced("sync"), priced("cheap")]))
    await answer_all(db, via_batch={"cheap"})
    full, discounted = 4 * 0.004, 4 * 0.004 * 0.75

    by_target = {t.target: t.cost for t in (await usage.run_usage(db, "run-1")).targets}
    assert by_target == pytest.approx({"sync": full, "cheap": discounted})

    out = io.StringIO()
    assert await write_results(db, "run-1", out, "jsonl") == 8
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    assert {(r["target"], r["via_batch"], round(r["cost"], 9)) for r in rows} == {
        ("sync", False, 0.004),
        ("cheap", True, 0.003),
    }

    summary = await dashboard.run_summary(db, "run-1")
    assert summary is not None and summary.cost == pytest.approx(full + discounted)
    panel = {t["target"]: t["cost"] for t in await dashboard.target_stats(db, "run-1")}
    assert panel == pytest.approx({"sync": full, "cheap": discounted})


async def test_a_budget_reserves_and_spends_a_batch_request_at_the_discount(
    db: asyncpg.Connection,
) -> None:
    await add_prompts(db, 1)
    # 0.0035 fits one request of 1,000 + 1,000 tokens at the discount (0.003), not in full.
    s = spec(targets=[priced("cheap")], budget={"maxCost": 0.0035})
    await new_run(db, "run-1", s)
    est = TokenEstimate(1000, 1000)
    assert await budget.reserve(db, "run-1", "cheap", est, via_batch=True)
    state = await budget.state(db, "run-1")
    assert state is not None and state.reserved_cost == pytest.approx(0.003)
    await budget.settle(db, "run-1", "cheap", est, 1000, 1000, via_batch=True)
    state = await budget.state(db, "run-1")
    assert state is not None
    assert state.reserved_cost == pytest.approx(0) and state.spent_cost == pytest.approx(0.003)


async def test_a_run_s_budget_covers_its_provider_batches(
    db: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    """Each batch reserves its requests' estimate (at the discount) before it is sent, cut
    to what fits; answers are spent as they are written; the run pauses for its budget when
    not one more request fits, with every item left pending, none failed or lost."""
    from test_batch_driver import driver, target

    from analysisq.fake_provider import FakeConfig, FakeProvider
    from analysisq.providers import make_http_client
    from analysisq.queue import runs

    http = make_http_client(trust_env=False)
    async with FakeProvider(FakeConfig(batch_seconds=0.2)) as fake:
        await add_prompts(db, 100)
        batch = {
            **target(fake, "openai"),
            "params": {"max_tokens": 100},
            "pricing": {"inputPerMillionTokens": 1000, "outputPerMillionTokens": 1000},
        }
        # About 0.11 a request in full, 0.055 through a batch: 2.0 covers ~36 batch requests.
        await new_run(db, "run-1", spec(targets=[batch], budget={"maxCost": 2.0}))
        run = await runs.get_run(db, "run-1")
        d = driver(pool, run, http, "w1")
        try:
            for _ in range(400):
                await d.round()
                state = await budget.state(db, "run-1")
                assert state is not None
                if state.exhausted and not await db.fetchval(
                    "SELECT count(*) FROM batch_submissions WHERE state <> 'done'"
                ):
                    break
                await asyncio.sleep(0.05)
        finally:
            await http.aclose()
    assert state.exhausted
    counts = await runs.counts(db, "run-1")
    assert 0 < counts.completed < 100 and counts.failed_for_good == 0 and counts.processing == 0
    assert counts.pending == 100 - counts.completed
    unspent = "SELECT max(attempts) FROM analysis_queue WHERE status = 'pending'"
    assert await db.fetchval(unspent) == 0
    shown = (await usage.run_usage(db, "run-1")).cost
    assert shown is not None and state.spent_cost == pytest.approx(shown)
    assert state.spent_cost <= 2.0 and state.reserved_cost == pytest.approx(0)
    assert state.reserved_tokens == 0
    # At full price 2.0 would have covered about 18 answers: the discount was applied.
    assert counts.completed > 25

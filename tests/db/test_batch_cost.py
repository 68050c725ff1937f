"""The batch discount: an answer through a provider batch costs ``1 - batchDiscount`` of the
price, wherever cost is shown or spent (usage, export, dashboard, budgets)."""

from __future__ import annotations

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
    claimed = await items.claim(db, "run-1", worker="w", limit=100, lease_seconds=60,
                                max_attempts=3)  # fmt: skip
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

"""The dashboard's panel queries stay cheap: each reads one run through an index led by
``run_id``, never the whole queue or results table (docs/dashboard.md states the cost).

A large finished run (20,000 items and results) sits next to twenty small ones; with fresh
statistics the plan of every panel query for a small run must not scan either table in full,
and the runs list does not read the items of the finished run it already counted.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest

from analysisq.db.sql import query
from analysisq.kube.provider_metrics import LATENCY_BOUNDS
from analysisq.queue import runs
from support import add_prompts, spec

pytestmark = [pytest.mark.db, pytest.mark.timeout(180)]

PANELS: dict[str, dict[str, object]] = {
    # + the finished run the dashboard already counted
    "dashboard_runs": {"limit": 20, "window_seconds": 60.0, "run_id": None},
    "dashboard_timeline": {"run_id": "small", "buckets": 60},
    "dashboard_targets": {"run_id": "small", "window_seconds": 60.0},
    "dashboard_failed_items": {"run_id": "small", "limit": 20, "excerpt_chars": 160},
    "dashboard_stuck_items": {"run_id": "small", "older_than_seconds": 900.0, "limit": 20},
    "dashboard_run_exists": {"run_id": "small"},
    "error_summary": {"run_id": "small", "limit": 20},
    "provider_outcomes": {"run_id": "small"},
    "provider_latency": {"run_id": "small", "bounds": list(LATENCY_BOUNDS)},
}


def plan_nodes(plan: object) -> Iterator[dict[str, Any]]:
    """Every node of an EXPLAIN (FORMAT JSON) plan."""
    if isinstance(plan, dict):
        if "Node Type" in plan:
            yield plan
        for value in plan.values():
            yield from plan_nodes(value)
    elif isinstance(plan, list):
        for value in plan:
            yield from plan_nodes(value)


def full_scans(plan: object) -> set[str]:
    """Tables the plan reads with a sequential scan."""
    return {str(n.get("Relation Name")) for n in plan_nodes(plan) if n["Node Type"] == "Seq Scan"}


def rows_read(plan: object, table: str) -> float:
    """Rows an EXPLAIN ANALYZE plan read from *table* (over every loop)."""
    return sum(
        n.get("Actual Rows", 0) * n.get("Actual Loops", 1)
        for n in plan_nodes(plan)
        if n.get("Relation Name") == table
    )


async def test_panel_queries_read_one_run_through_an_index(db: asyncpg.Connection) -> None:
    ids = await add_prompts(db, 20_000)
    small = [("small", ids[:50])] + [(f"s{i}", ids[50 * i : 50 * i + 50]) for i in range(1, 20)]
    for run_id, selected in [("big", None), *small]:
        s = spec(prompts={"ids": selected}) if selected else spec()
        await runs.create_run(db, run_id, s)
        await runs.fill(db, run_id, s)
    # The big run finished long ago: completed items with their results.
    await db.execute(
        "UPDATE analysis_queue SET status = 'completed', completed_at = now(),"
        " next_attempt_at = NULL WHERE run_id = 'big'"
    )
    await db.execute(
        "INSERT INTO analysis_results (queue_id, run_id, prompt_tracking_id, target, model,"
        " response_text, tokens_in, tokens_out, latency_ms, attempt)"
        " SELECT id, run_id, prompt_tracking_id, target, 'echo-1', 'ok', 1, 1, 5, 1"
        " FROM analysis_queue WHERE run_id = 'big'"
    )
    await runs.mark_finished(db, "big")
    finished_at = await db.fetchval("SELECT finished_at FROM analysis_runs WHERE id = 'big'")
    await db.execute("ANALYZE")
    for name, values in PANELS.items():
        if name == "dashboard_runs":
            continue  # executed below: its per-run subplans run only when they apply
        q = query(name)
        plan = json.loads(await db.fetchval("EXPLAIN (FORMAT JSON) " + q.text, *q.args(**values)))
        scanned = full_scans(plan) & {"analysis_queue", "analysis_results"}
        assert not scanned, f"{name} scans {scanned} in full: {json.dumps(plan)[:2000]}"

    # Executed: the runs list reads the 20 small runs' items, none of the big finished run's,
    # and no result at all (no target has pricing, so there is no cost to add up).
    q = query("dashboard_runs")
    args = q.args(**PANELS["dashboard_runs"], known_ids=["big"], known_finished_at=[finished_at])
    plan = json.loads(await db.fetchval("EXPLAIN (ANALYZE, FORMAT JSON) " + q.text, *args))
    assert rows_read(plan, "analysis_queue") == 20 * 50
    assert rows_read(plan, "analysis_results") == 0

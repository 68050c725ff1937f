"""Retention: ``analysisq prune`` removes finished runs' queue rows (and results when asked),
in bounded batches that skip locked rows, leaving active and recent runs alone."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import asyncpg
import pytest
from test_runbook_cli import invoke, invoke_json

from analysisq.completion import Completion
from analysisq.queue import items, runs
from analysisq.queue.prune import prune
from support import add_prompts, new_run, spec

pytestmark = pytest.mark.db

DAY = 86_400.0
OK = Completion("answer", None, 1, 1, "echo-1", 1.0)


async def finished_run(db: asyncpg.Connection, run_id: str, days_ago: float, n: int) -> None:
    """A run of *n* items, every one completed, finished *days_ago* days ago."""
    ids = await db.fetch("SELECT external_id FROM prompts ORDER BY id LIMIT $1", n)
    await new_run(db, run_id, spec(prompts={"ids": [r[0] for r in ids]}))
    claimed = await items.claim(db, run_id, worker="w", limit=n, lease_seconds=60)  # fmt: skip
    assert len(await items.complete(db, [items.Outcome(i, OK) for i in claimed])) == n
    await runs.mark_finished(db, run_id)
    await db.execute(
        "UPDATE analysis_runs SET finished_at = now() - make_interval(secs => $2) WHERE id = $1",
        run_id, days_ago * DAY,
    )  # fmt: skip


async def rows(db: asyncpg.Connection, table: str, run_id: str) -> int:
    return int(await db.fetchval(f"SELECT count(*) FROM {table} WHERE run_id = $1", run_id))


async def test_old_finished_runs_lose_their_queue_rows_and_keep_results(
    db: asyncpg.Connection,
) -> None:
    await add_prompts(db, 30)
    await finished_run(db, "old", 40, 25)
    await finished_run(db, "recent", 2, 10)
    await new_run(db, "active")  # 30 pending items, never finished
    report = await prune(db, 30 * DAY, batch=7)  # 25 rows: four batches
    assert report.runs == ["old"] and report.queue_rows == 25 and report.results == 0
    assert await rows(db, "analysis_queue", "old") == 0
    assert await rows(db, "analysis_results", "old") == 25  # kept
    assert await rows(db, "analysis_queue", "recent") == 10
    assert await rows(db, "analysis_queue", "active") == 30
    assert await db.fetchval("SELECT pruned_at IS NOT NULL FROM analysis_runs WHERE id = 'old'")
    assert (await prune(db, 30 * DAY)).runs == []  # nothing left to do


async def test_results_too_when_asked(db: asyncpg.Connection) -> None:
    await add_prompts(db, 12)
    await finished_run(db, "old", 40, 12)
    first = await prune(db, 30 * DAY)
    assert first.runs == ["old"] and first.results == 0
    # a later prune with results takes the results of the run already pruned
    report = await prune(db, 30 * DAY, results=True, batch=5)
    assert report.runs == ["old"] and report.results == 12 and report.exported == 0
    assert await rows(db, "analysis_results", "old") == 0
    assert (await prune(db, 30 * DAY, results=True)).runs == []


async def test_cli_exports_before_deleting_results(
    db: asyncpg.Connection, db_url: str, tmp_path: Path
) -> None:
    await add_prompts(db, 12)
    await finished_run(db, "old", 40, 12)
    await finished_run(db, "kept", 1, 3)
    got = await invoke_json(db_url, "prune", "--older-than", "30d", "--results",
                            "--export", str(tmp_path))  # fmt: skip
    assert got["runs"] == ["old"] and got["exported"] == got["results"] == 12
    lines = (tmp_path / "old.jsonl").read_text().splitlines()
    assert len(lines) == 12 and {json.loads(line)["response_text"] for line in lines} == {"answer"}
    assert await rows(db, "analysis_results", "old") == 0
    assert await rows(db, "analysis_results", "kept") == 3


async def test_cli_refuses_an_export_without_results(db_url: str) -> None:
    result = await invoke(db_url, "prune", "--older-than", "30d", "--export", "/tmp/x")
    assert result.exit_code == 2 and "add --results" in result.output
    result = await invoke(db_url, "prune", "--older-than", "soon")
    assert result.exit_code == 2 and "invalid duration 'soon'" in result.output


async def test_prune_never_waits_on_locked_rows(
    db: asyncpg.Connection, db_url: str, client_options: dict[str, object]
) -> None:
    """A row held by another transaction (a claim of a live run next door, or any lock on a
    finished run's row) is skipped, not waited for; the next prune takes it."""
    await add_prompts(db, 20)
    await finished_run(db, "old", 40, 10)
    await new_run(db, "active")
    holder = await asyncpg.connect(db_url, **client_options)
    try:
        tx = holder.transaction()
        await tx.start()
        await items.claim(holder, "active", worker="w", limit=5, lease_seconds=60)  # fmt: skip
        await holder.execute(
            "SELECT 1 FROM analysis_queue WHERE run_id = 'old' ORDER BY id LIMIT 1 FOR UPDATE"
        )
        report = await asyncio.wait_for(prune(db, 30 * DAY, batch=3), timeout=10)
        assert report.queue_rows == 9 and report.incomplete == ["old"] and report.runs == []
        await tx.commit()
    finally:
        await holder.close()
    report = await prune(db, 30 * DAY)
    assert report.runs == ["old"] and report.queue_rows == 1


async def test_deleting_a_run_still_deletes_its_results(db: asyncpg.Connection) -> None:
    """Results no longer cascade from queue rows (retention keeps them): delete_run removes
    them itself."""
    await add_prompts(db, 4)
    await finished_run(db, "gone", 1, 4)
    await runs.delete_run(db, "gone")
    assert await rows(db, "analysis_results", "gone") == 0
    assert await rows(db, "analysis_queue", "gone") == 0

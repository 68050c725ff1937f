"""The runbook commands against a populated queue: their ``--json`` answers match the known
numbers of items in each state, per run and across runs.

The queue (run-1, 40 items): 20 pending, 10 completed, 4 failed for good ('timeout'),
2 failed for good ('bad request'), 2 retrying ('HTTP 503'), 2 processing whose worker died
20 minutes ago (stuck). run-2 has 5 pending items of its own.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from click.testing import CliRunner, Result

from analysisq.cli.main import cli
from analysisq.completion import Completion
from analysisq.errors import ErrorClass
from analysisq.queue import items, runs
from support import add_prompts, new_run, spec

pytestmark = pytest.mark.db


async def invoke(db_url: str, *args: str) -> Result:
    """Run ``analysisq ARGS`` in a thread (it runs its own event loop), logging untouched."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level

    def call() -> Result:
        return CliRunner().invoke(cli, ["--database-url", db_url, *args])

    try:
        return await asyncio.to_thread(call)
    finally:
        root.handlers[:], root.level = handlers, level


async def invoke_json(db_url: str, *args: str) -> Any:
    result = await invoke(db_url, *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


async def populate(db: asyncpg.Connection) -> list[str]:
    ids = await add_prompts(db, 40)
    await new_run(db, "run-1")
    await new_run(db, "run-2", spec(prompts={"ids": ids[:5]}))
    claimed = await items.claim(db, "run-1", worker="w", limit=20, lease_seconds=60)
    done = [
        items.Outcome(i, Completion("ok", {"a": 1}, 3, 4, "echo-1", 12.5)) for i in claimed[:10]
    ]
    assert len(await items.complete(db, done)) == 10
    for i in claimed[10:14]:
        assert await items.fail(db, i, ErrorClass.TRANSIENT, "timeout", None)
    for i in claimed[14:16]:
        assert await items.fail(db, i, ErrorClass.PERMANENT, "bad request", None)
    for i in claimed[16:18]:
        assert await items.fail(db, i, ErrorClass.TRANSIENT, "HTTP 503", 300.0)
    await db.execute(
        "UPDATE analysis_queue SET updated_at = now() - interval '20 minutes',"
        " lease_expires_at = now() - interval '19 minutes' WHERE id = ANY($1)",
        [i.id for i in claimed[18:20]],
    )
    return ids


async def test_status_per_run_and_overall(db: asyncpg.Connection, db_url: str) -> None:
    await populate(db)
    data = await invoke_json(db_url, "status", "run-1")
    assert data["run"] == "run-1"
    assert [(s["status"], s["count"], s["percent"]) for s in data["statuses"]] == [
        ("pending", 20, 50.0),
        ("processing", 2, 5.0),
        ("completed", 10, 25.0),
        ("failed", 8, 20.0),
    ]
    assert data["counts"] == {
        "total": 40, "pending": 20, "processing": 2, "completed": 10, "failed": 6,
        "retrying": 2, "stuck": 2,
    }  # fmt: skip
    assert data["items_per_second"] == round(10 / 60, 2)
    assert data["paused_targets"] == {}

    overall = await invoke_json(db_url, "status")
    assert overall["run"] is None and "counts" not in overall
    assert [(s["status"], s["count"]) for s in overall["statuses"]] == [
        ("pending", 25), ("processing", 2), ("completed", 10), ("failed", 8),
    ]  # fmt: skip

    table = await invoke(db_url, "status", "run-1")
    assert table.exit_code == 0
    assert "failed 6 for good, 2 retrying; 2 stuck" in table.stdout


async def test_stuck_failed_errors(db: asyncpg.Connection, db_url: str) -> None:
    await populate(db)
    stuck = await invoke_json(db_url, "stuck", "run-1")
    assert (stuck["stuck_items"], stuck["lease_expired"]) == (2, 2)
    assert (await invoke_json(db_url, "stuck", "run-2"))["stuck_items"] == 0

    failed = await invoke_json(db_url, "failed", "run-1", "--limit", "100")
    assert len(failed["items"]) == 8
    assert sum(1 for i in failed["items"] if i["will_retry"]) == 2
    assert {i["error_message"] for i in failed["items"]} == {"timeout", "bad request", "HTTP 503"}
    assert len((await invoke_json(db_url, "failed", "--limit", "3"))["items"]) == 3

    errors = await invoke_json(db_url, "errors", "run-1")
    assert [(e["error_class"], e["error_message"], e["count"]) for e in errors["errors"]] == [
        ("transient", "timeout", 4),
        ("transient", "HTTP 503", 2),
        ("permanent", "bad request", 2),
    ]
    assert errors["classes"] == {"transient": 6, "permanent": 2}


async def test_cleanup_resets_the_stuck_items(db: asyncpg.Connection, db_url: str) -> None:
    await populate(db)
    assert await invoke_json(db_url, "cleanup", "run-2") == {
        "run": "run-2", "reset_count": 0, "poisoned_count": 0,
    }  # fmt: skip
    assert await invoke_json(db_url, "cleanup") == {
        "run": None, "reset_count": 2, "poisoned_count": 0,
    }  # fmt: skip
    counts = await runs.counts(db, "run-1")
    assert (counts.pending, counts.processing, counts.stuck) == (22, 0, 0)


async def test_runs_and_results(db: asyncpg.Connection, db_url: str, tmp_path: Path) -> None:
    await populate(db)
    listed = (await invoke_json(db_url, "runs"))["runs"]
    assert {r["id"]: r["counts"]["total"] for r in listed} == {"run-1": 40, "run-2": 5}

    out = tmp_path / "results.csv"
    result = await invoke(db_url, "results", "run-1", "--output", str(out))
    assert result.exit_code == 0, result.output
    lines = out.read_text().splitlines()
    assert lines[0].startswith("prompt_id,target,model,response_text,parsed")
    assert len(lines) == 11

    streamed = await invoke(db_url, "results", "run-1")
    rows = [json.loads(line) for line in streamed.stdout.splitlines()]
    assert len(rows) == 10 and len({r["queue_id"] for r in rows}) == 10
    assert rows[0]["parsed"] == {"a": 1} and rows[0]["attempt"] == 1

    missing = await invoke(db_url, "results", "no-such-run")
    assert missing.exit_code == 1 and "no run 'no-such-run'" in missing.stderr


async def test_targets_pause_and_resume(db: asyncpg.Connection, db_url: str) -> None:
    await populate(db)
    assert await runs.pause_target(db, "run-1", "echo", "HTTP 401: invalid api key")
    listed = await invoke_json(db_url, "targets", "run-1")
    assert [(t["target"], t["pause_reason"]) for t in listed["targets"]] == [
        ("echo", "HTTP 401: invalid api key")
    ]
    assert (await invoke_json(db_url, "status", "run-1"))["paused_targets"] == {
        "echo": "HTTP 401: invalid api key"
    }
    assert await invoke_json(db_url, "targets", "resume", "run-1", "echo") == {
        "run": "run-1", "resumed": ["echo"],
    }  # fmt: skip
    again = await invoke(db_url, "targets", "resume", "run-1")
    assert again.exit_code == 0 and "no paused target" in again.stdout
    assert (await runs.targets(db, "run-1"))[0].paused_at is None


async def test_retry_puts_failed_items_back_by_filter(db: asyncpg.Connection, db_url: str) -> None:
    await populate(db)
    refused = await invoke(db_url, "retry", "run-1", "--class", "permament")
    assert refused.exit_code == 2 and "'permament' is not one of" in refused.output
    unknown = await invoke(db_url, "retry", "run-1", "--target", "nope")
    assert unknown.exit_code == 2 and "unknown target 'nope'" in unknown.output
    assert await invoke_json(db_url, "retry", "run-1", "--error", "BAD REQ") == {
        "run": "run-1", "retried": 2,
    }  # fmt: skip
    counts = (await invoke_json(db_url, "status", "run-1"))["counts"]
    assert (counts["pending"], counts["failed"], counts["retrying"]) == (22, 4, 2)
    result = await invoke(db_url, "retry", "run-1", "--class", "transient", "--target", "echo")
    assert result.exit_code == 0, result.output
    assert "put 4 failed items of run run-1 back" in result.output
    assert "analysisq run --resume run-1" in result.output
    again = await invoke(db_url, "retry", "run-1")
    assert "no failed-for-good item of run run-1 matches" in again.output
    kept = await db.fetch("SELECT last_error FROM analysis_queue WHERE retries = 1")
    assert sorted(r[0] for r in kept) == ["permanent: bad request"] * 2 + ["transient: timeout"] * 4

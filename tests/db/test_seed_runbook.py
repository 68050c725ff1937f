# ruff: noqa: W291 - the seed queries are copied verbatim, trailing spaces included
"""Every monitoring and troubleshooting query of the seed runs verbatim and tells the truth.

The queries below are copied character for character from the seed's "Monitoreo" and
"Troubleshooting" sections. The queue is populated with known numbers of items in each state,
including items stuck by a dead worker, and each query's answer is checked against them.
"""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import asyncpg
import pytest

from analysisq.errors import ErrorClass
from analysisq.queue import items, rescue
from support import add_prompts, new_run

pytestmark = pytest.mark.db

SEED_STATUS = """SELECT 
    status,
    COUNT(*) as cantidad,
    ROUND(100.0 * COUNT(*) / (SELECT COUNT(*) FROM analysis_queue), 2) as porcentaje
FROM analysis_queue
GROUP BY status
ORDER BY 
    CASE status
        WHEN 'pending' THEN 1
        WHEN 'processing' THEN 2
        WHEN 'completed' THEN 3
        WHEN 'failed' THEN 4
    END;"""

SEED_STUCK = """SELECT 
    COUNT(*) as stuck_items,
    MIN(updated_at) as mas_antiguo
FROM analysis_queue
WHERE status = 'processing'
  AND updated_at < NOW() - INTERVAL '10 minutes';"""

SEED_FAILED = """SELECT 
    id,
    prompt_tracking_id,
    attempts,
    error_message,
    updated_at
FROM analysis_queue
WHERE status = 'failed'
ORDER BY updated_at DESC
LIMIT 20;"""

SEED_CLEANUP = "SELECT * FROM cleanup_stuck_queue_items();"

SEED_ERRORS = """SELECT DISTINCT error_message, COUNT(*) 
FROM analysis_queue 
WHERE status = 'failed'
GROUP BY error_message
ORDER BY COUNT(*) DESC;"""

SEED_CRON = "SELECT * FROM cron.job WHERE jobname = 'cleanup-stuck-queue-items';"


async def _populate(db: asyncpg.Connection) -> None:
    """40 items: 20 pending, 4 processing (2 of them stuck 20 minutes), 10 completed,
    6 failed (4 'timeout', 2 'bad request')."""
    await add_prompts(db, 40)
    await new_run(db)
    claimed = await items.claim(db, "run-1", worker="w", limit=20, lease_seconds=60)
    from analysisq.completion import Completion

    done = [items.Outcome(i, Completion("ok", None, 1, 1, "echo-1", 1.0)) for i in claimed[:10]]
    assert len(await items.complete(db, done)) == 10
    for i in claimed[10:14]:
        assert await items.fail(db, i, ErrorClass.TRANSIENT, "timeout", None)
    for i in claimed[14:16]:
        assert await items.fail(db, i, ErrorClass.PERMANENT, "bad request", None)
    # claimed[16:20] stay processing; two of them belong to a worker that died 20 minutes ago
    stale = [i.id for i in claimed[16:18]]
    await db.execute(
        "UPDATE analysis_queue SET updated_at = now() - interval '20 minutes',"
        " lease_expires_at = now() - interval '19 minutes' WHERE id = ANY($1)",
        stale,
    )


async def test_status_query(db: asyncpg.Connection) -> None:
    await _populate(db)
    rows = [tuple(r) for r in await db.fetch(SEED_STATUS)]
    assert rows == [
        ("pending", 20, Decimal("50.00")),
        ("processing", 4, Decimal("10.00")),
        ("completed", 10, Decimal("25.00")),
        ("failed", 6, Decimal("15.00")),
    ]


async def test_stuck_query_sees_exactly_the_dead_workers_items(db: asyncpg.Connection) -> None:
    await _populate(db)
    row = await db.fetchrow(SEED_STUCK)
    assert row["stuck_items"] == 2
    age = await db.fetchval("SELECT now() - $1::timestamptz", row["mas_antiguo"])
    assert timedelta(minutes=19) < age < timedelta(minutes=21)


async def test_failed_query(db: asyncpg.Connection) -> None:
    await _populate(db)
    rows = await db.fetch(SEED_FAILED)
    assert len(rows) == 6
    assert {r["error_message"] for r in rows} == {"timeout", "bad request"}
    assert all(r["attempts"] == 1 for r in rows)


async def test_errors_query(db: asyncpg.Connection) -> None:
    await _populate(db)
    rows = [tuple(r) for r in await db.fetch(SEED_ERRORS)]
    assert rows == [("timeout", 4), ("bad request", 2)]


async def test_cleanup_function_resets_only_the_stuck_items(db: asyncpg.Connection) -> None:
    await _populate(db)
    rows = await db.fetch(SEED_CLEANUP)
    assert [tuple(r) for r in rows] == [(2, 0)]
    assert (await db.fetchrow(SEED_STUCK))["stuck_items"] == 0
    counts = dict(
        await db.fetch("SELECT status, count(*) FROM analysis_queue GROUP BY status")  # type: ignore[arg-type]
    )
    assert counts == {"pending": 22, "processing": 2, "completed": 10, "failed": 6}
    # running it again finds nothing: the live leases are not touched
    assert (await rescue.rescue_stuck(db)).reset == 0


async def test_cron_check_query_runs(db: asyncpg.Connection) -> None:
    """The seed's pg_cron check needs pg_cron, which analysisq does not ship (the operator's
    timer does the hourly reset): without it the query fails, as docs/runbook.md says.

    With a stand-in for pg_cron's catalog holding the job docs/runbook.md schedules, the
    query finds the job and the job's command runs against our schema.
    """
    with pytest.raises(asyncpg.exceptions.UndefinedTableError):
        await db.fetch(SEED_CRON)
    await db.execute(
        "CREATE SCHEMA cron; CREATE TABLE cron.job (jobid serial, schedule text,"
        " command text, jobname text);"
        "INSERT INTO cron.job (schedule, command, jobname) VALUES"
        " ('0 * * * *', 'SELECT * FROM cleanup_stuck_queue_items()',"
        " 'cleanup-stuck-queue-items')"
    )
    rows = await db.fetch(SEED_CRON)
    assert len(rows) == 1
    await db.fetch(rows[0]["command"])

"""``fill --reads``: which index each whole-table read of the queue uses, and what it costs.

Migration 0011 narrowed ``analysis_queue_status_idx`` from every row ``(status, updated_at)``
to the failed rows ``(updated_at)``, so that a fill, a claim or a heartbeat no longer writes an
entry into it. This shows what that costs the reads that are not scoped by a run (the seed's
runbook queries and their ``analysisq`` counterparts): on a filled queue with items in every
state, each query's plan (the indexes it reads) and time with the index as in ``sql/`` and
with the full index it replaced (built in a transaction rolled back afterwards).
"""

from __future__ import annotations

import re

import asyncpg

from analysisq.db.sql import query

from .common import stopwatch

#: The seed's runbook queries (docs/runbook.md) and the CLI's reads over the whole queue.
READS = {
    "seed status (GROUP BY status)": "SELECT status, count(*),"
    " round(100.0 * count(*) / (SELECT count(*) FROM analysis_queue), 2)"
    " FROM analysis_queue GROUP BY status",
    "seed stuck": "SELECT count(*), min(updated_at) FROM analysis_queue"
    " WHERE status = 'processing' AND updated_at < now() - interval '10 minutes'",
    "seed failed (newest 20)": "SELECT id, prompt_tracking_id, attempts, error_message,"
    " updated_at FROM analysis_queue WHERE status = 'failed' ORDER BY updated_at DESC LIMIT 20",
    "seed errors": "SELECT DISTINCT error_message, count(*) FROM analysis_queue"
    " WHERE status = 'failed' GROUP BY error_message ORDER BY count(*) DESC",
}
CLI_READS = {
    "analysisq failed": ("failed_items", {"run_id": None, "limit": 20}),
    "analysisq errors": ("error_summary", {"run_id": None, "limit": 20}),
    "analysisq stuck": ("stuck_items", {"run_id": None, "older_than_seconds": 600}),
}
FULL_INDEX = (
    "DROP INDEX analysis_queue_status_idx;"
    " CREATE INDEX analysis_queue_status_idx ON analysis_queue (status, updated_at);"
    " ANALYZE analysis_queue"
)
_INDEX = re.compile(
    r"(?:Index Only Scan|Index Scan|Bitmap Index Scan)(?: Backward)? (?:using|on) (\w+)"
)
_SEQ = re.compile(r"Seq Scan on (\w+)")


async def spread_states(conn: asyncpg.Connection, run_id: str) -> dict[str, int]:
    """Put the filled run's items in every state: 60% completed, 2,000 processing, 5,000
    failed (half of them for good), the rest pending; then VACUUM ANALYZE."""
    total = int(
        await conn.fetchval("SELECT count(*) FROM analysis_queue WHERE run_id = $1", run_id)
    )
    done = total * 6 // 10
    await conn.execute(
        "UPDATE analysis_queue SET status = 'completed', completed_at = now(),"
        " next_attempt_at = NULL"
        " WHERE run_id = $1 AND id <= (SELECT min(id) FROM analysis_queue) + $2",
        run_id,
        done - 1,
    )
    await conn.execute(
        "WITH x AS (SELECT id, row_number() OVER (ORDER BY id) AS n FROM analysis_queue"
        " WHERE run_id = $1 AND status = 'pending' ORDER BY id LIMIT 7000)"
        " UPDATE analysis_queue q SET"
        " status = CASE WHEN x.n <= 2000 THEN 'processing' ELSE 'failed' END,"
        " lease_owner = CASE WHEN x.n <= 2000 THEN 'w' END,"
        " lease_expires_at = CASE WHEN x.n <= 2000 THEN now() + interval '1 minute' END,"
        " claim_token = CASE WHEN x.n <= 2000 THEN gen_random_uuid() END,"
        " error_class = CASE WHEN x.n > 2000 THEN 'transient' END,"
        " error_message = CASE WHEN x.n > 2000 THEN 'timeout ' || (x.n % 7) END,"
        " next_attempt_at = CASE WHEN x.n > 4500 THEN now() + interval '1 hour' END"
        " FROM x WHERE q.id = x.id",
        run_id,
    )
    await conn.execute("VACUUM ANALYZE analysis_queue")
    rows = await conn.fetch("SELECT status, count(*) FROM analysis_queue GROUP BY status")
    return {r[0]: int(r[1]) for r in rows}


async def _measure(conn: asyncpg.Connection) -> dict[str, tuple[str, float]]:
    """Each read's scanned relations (from its plan) and its best time of three, in ms."""
    out: dict[str, tuple[str, float]] = {}
    statements: dict[str, tuple[str, tuple[object, ...]]] = {k: (v, ()) for k, v in READS.items()}
    for label, (name, params) in CLI_READS.items():
        q = query(name)
        statements[label] = (q.text, q.args(**params))
    for label, (text, args) in statements.items():
        plan = "\n".join(r[0] for r in await conn.fetch("EXPLAIN " + text, *args))
        used = sorted(set(_INDEX.findall(plan)) | {f"{t} (seq)" for t in _SEQ.findall(plan)})
        best = float("inf")
        for _ in range(3):
            with stopwatch() as t:
                await conn.fetch(text, *args)
            best = min(best, t[0])
        out[label] = (", ".join(used), best * 1000)
    return out


async def compare(conn: asyncpg.Connection) -> list[list[object]]:
    """Rows: read, its plan and ms with the index of sql/, then with the full index."""
    now = await _measure(conn)
    tr = conn.transaction()
    await tr.start()
    try:
        await conn.execute(FULL_INDEX)
        before = await _measure(conn)
        size = await conn.fetchval("SELECT pg_relation_size('analysis_queue_status_idx')")
    finally:
        await tr.rollback()
    now_size = await conn.fetchval("SELECT pg_relation_size('analysis_queue_status_idx')")
    rows: list[list[object]] = [
        [
            label,
            now[label][0],
            round(now[label][1], 1),
            before[label][0],
            round(before[label][1], 1),
        ]
        for label in now
    ]
    rows.append(["index size, MB", "", round(now_size / 2**20, 1), "", round(size / 2**20, 1)])
    return rows

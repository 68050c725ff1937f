"""The proof of issue 9: a harsh run in which every item still ends explained, none as poison.

Items over two targets (two fake providers), each answering 30% transient errors (500, 503),
1% permanent (400) and 10% 429 with ``Retry-After: 1``; real ``analysisq worker`` processes,
one of them SIGKILLed at random every 5 s (and replaced, as a Deployment would); two
PostgreSQL restarts mid-run, the first a crash (``pg_ctl stop -m immediate``). At the end:
every item terminal, no result twice, every failed item explained by a permanent answer or by
exhausted attempts, and not one failed as poison.

CI runs ``ANALYSISQ_CHAOS_ITEMS`` = 3,000 items (the default); the issue's 10,000:

    ANALYSISQ_CHAOS_ITEMS=10000 .venv/bin/pytest tests/chaos/test_faults_proof.py -s

prints the figures (``-s``) for docs/benchmarks.md.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from workers import WorkerProcs

from analysisq.db.embedded import EmbeddedPostgres
from analysisq.db.migrate import migrate
from analysisq.errors import DatabaseError
from analysisq.fake_provider.config import FakeConfig
from analysisq.fake_provider.server import FakeProvider
from analysisq.queue import runs
from support import add_prompts, new_run, spec

ITEMS = int(os.environ.get("ANALYSISQ_CHAOS_ITEMS", "3000"))
WORKERS = 4
KILL_EVERY_S = 5.0
LEASE = 5

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(300 + ITEMS // 10)]

FAULTS = FakeConfig(
    latency_ms=30,
    jitter_ms=20,
    errors={"500": 0.15, "503": 0.15, "400": 0.01, "429": 0.10},
    retry_after_s=1,
    seed=None,
)


async def _terminal(url: str) -> int | None:
    """Items of the run that are terminal; None while the database is away."""
    try:
        conn = await asyncpg.connect(url, timeout=2)
    except (TimeoutError, OSError, asyncpg.PostgresError):
        return None
    try:
        return (await runs.counts(conn, "run-1")).terminal
    except (DatabaseError, OSError, asyncpg.PostgresError):
        return None
    finally:
        await conn.close()


async def _chaos(pg: EmbeddedPostgres, url: str, procs: WorkerProcs) -> dict[str, Any]:
    """Kill a random worker every 5 s (and start another) and restart the server at a third
    and at two thirds of the run, until every item ends."""
    rng = random.Random()
    restarts = [(ITEMS / 3, "immediate"), (2 * ITEMS / 3, "fast")]
    killed: list[int] = []
    done: list[str] = []
    next_kill = time.monotonic() + KILL_EVERY_S
    started = time.monotonic()
    while time.monotonic() - started < 240 + ITEMS / 10:
        terminal = await _terminal(url)
        if terminal == ITEMS:
            break
        if terminal is not None and restarts and terminal >= restarts[0][0]:
            mode = restarts.pop(0)[1]
            await asyncio.to_thread(pg.stop, mode)
            await asyncio.sleep(3)
            await asyncio.to_thread(pg.start)
            done.append(mode)
        if time.monotonic() >= next_kill:
            live = [p for p in procs.procs if p.poll() is None]
            if live:
                victim = rng.choice(live)
                victim.send_signal(signal.SIGKILL)
                victim.wait()
                killed.append(victim.pid)
            procs.start(1)  # as the Deployment would
            next_kill += KILL_EVERY_S
        await asyncio.sleep(0.2)
    return {"kills": len(killed), "killed": killed, "restarts": done,
            "seconds": round(time.monotonic() - started)}  # fmt: skip


async def test_every_item_ends_explained_and_none_as_poison(
    tmp_path: Path, procs_factory: list[WorkerProcs]
) -> None:
    with tempfile.TemporaryDirectory(prefix="aq-proof-") as d:
        pg = EmbeddedPostgres(Path(d), fsync=False)
        url = pg.start()
        try:
            conn = await asyncpg.connect(url)
            await migrate(conn)
            async with FakeProvider(FAULTS) as fa, FakeProvider(FAULTS) as fb:
                targets = [
                    {"name": "a", "provider": "openai", "model": "m-a", "endpoint": fa.url},
                    {"name": "b", "provider": "openai", "model": "m-b", "endpoint": fb.url},
                ]
                await add_prompts(conn, ITEMS // 2)
                s = spec(targets=targets, leaseSeconds=LEASE, batchSize=10)
                await new_run(conn, s=s)
                await conn.close()
                procs = WorkerProcs(url, "run-1", tmp_path)
                procs_factory.append(procs)
                procs.start(WORKERS)
                chaos = await _chaos(pg, url, procs)
                codes = await asyncio.to_thread(procs.wait, 120)
                requests = fa.stats().requests + fb.stats().requests
                by_status = {
                    k: fa.stats().by_status.get(k, 0) + fb.stats().by_status.get(k, 0)
                    for k in {**fa.stats().by_status, **fb.stats().by_status}
                }
            conn = await asyncpg.connect(url)
            try:
                counts = await runs.counts(conn, "run-1")
                results = await conn.fetchval("SELECT count(*) FROM analysis_results")
                distinct = await conn.fetchval(
                    "SELECT count(DISTINCT queue_id) FROM analysis_results"
                )
                failed = await conn.fetch(
                    "SELECT error_class, attempts, error_message FROM analysis_queue"
                    " WHERE status = 'failed'"
                )
                losses = await conn.fetchrow(
                    "SELECT count(*) FILTER (WHERE lease_losses > 0) AS items,"
                    " coalesce(max(lease_losses), 0) AS max FROM analysis_queue"
                )
            finally:
                await conn.close()
        finally:
            pg.stop(mode="immediate")

    permanent = [
        r for r in failed if r["error_class"] == "permanent" and "400" in r["error_message"]
    ]
    exhausted = [
        r for r in failed
        if r["attempts"] == s.max_attempts and r["error_message"].startswith("gave up after")
    ]  # fmt: skip
    killed = set(chaos.pop("killed"))
    poison = sum(r["error_class"] == "poison" for r in failed)
    figures = {
        "items": ITEMS, **chaos, "requests": requests, "by_status": by_status,
        "completed": counts.completed, "failed_permanent": len(permanent),
        "failed_exhausted": len(exhausted), "poison": poison,
        "items_with_lease_losses": losses["items"], "max_lease_losses": losses["max"],
    }  # fmt: skip
    crashed = [c for p, c in zip(procs.procs, codes, strict=True) if p.pid not in killed and c]
    print("\nchaos proof:", json.dumps(figures))
    assert not crashed, procs.logs()
    assert chaos["restarts"] == ["immediate", "fast"] and chaos["kills"] >= 3, figures
    assert counts.done and counts.total == ITEMS, (counts, figures)
    assert results == distinct == counts.completed, figures  # no result twice
    assert len(permanent) + len(exhausted) == len(failed), [
        dict(r) for r in failed if r not in permanent and r not in exhausted
    ][:10]
    assert figures["poison"] == 0, figures

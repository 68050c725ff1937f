"""SIGTERM to a busy ``analysisq worker`` process, as ``kubectl delete pod`` and a scale-down
send it: the worker claims nothing more, lets in-flight calls finish within its shutdown grace,
releases what is still in flight and the batch it prefetched (not an attempt) and exits 0,
before a kubelet's SIGKILL.
The real-node tier proves the same in the image on a kubelet (tests/node).
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import pytest
from test_worker_chaos import fake_spec, wait_for
from workers import WorkerProcs

from analysisq.fake_provider.config import FakeConfig
from analysisq.fake_provider.server import FakeProvider
from support import add_prompts, new_run

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(120)]

BATCH = 5

Start = Callable[[float], WorkerProcs]


@pytest.fixture
def start_worker(db_url: str, tmp_path: Path) -> Iterator[Start]:
    """Start one worker process of run-1 with a shutdown grace of N seconds."""
    made: list[WorkerProcs] = []

    def start(grace: float) -> WorkerProcs:
        procs = WorkerProcs(db_url, "run-1", tmp_path, ANALYSISQ_SHUTDOWN_GRACE_SECONDS=str(grace))
        made.append(procs)
        procs.start(1, exit_when_done=False)
        return procs

    yield start
    for procs in made:
        procs.close()


async def _busy(
    db: asyncpg.Connection, fake: FakeProvider, start_worker: Start, grace: float
) -> tuple[WorkerProcs, subprocess.Popen[bytes], list[int]]:
    """A worker process of a new run of 20 prompts, once it has a full batch in flight and
    one more prefetched, and the ids it holds."""
    await add_prompts(db, 20)
    await new_run(db, s=fake_spec(fake.url, leaseSeconds=30, batchSize=BATCH))
    procs = start_worker(grace)
    (proc,) = procs.procs
    await wait_for(db, "SELECT count(*) FROM analysis_queue WHERE status = 'processing'",
                   lambda n: n == 2 * BATCH, 60)  # fmt: skip
    rows = await db.fetch(
        "SELECT id FROM analysis_queue WHERE status = 'processing' AND lease_owner LIKE $1",
        f"%:{proc.pid}",
    )
    assert len(rows) == 2 * BATCH
    return procs, proc, [r["id"] for r in rows]


async def test_sigterm_releases_calls_slower_than_the_grace(
    db: asyncpg.Connection, start_worker: Start
) -> None:
    async with FakeProvider(FakeConfig(latency_ms=30_000)) as fake:
        procs, proc, held = await _busy(db, fake, start_worker, grace=1)
        began = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 30)
        took = time.monotonic() - began
    assert code == 0, procs.logs()
    # 1 s of grace, then the release: well before the call (30 s) or the lease would end.
    assert took < 20, f"{took:.1f} s to stop: {procs.logs()}"
    rows = await db.fetch(
        "SELECT status, attempts, lease_losses, lease_owner FROM analysis_queue"
        " WHERE id = ANY($1::bigint[])",
        held,
    )
    # Pending again with the claim's attempt given back, and no lease ran out.
    assert {tuple(r) for r in rows} == {("pending", 0, 0, None)}, procs.logs()


async def test_sigterm_lets_calls_within_the_grace_finish(
    db: asyncpg.Connection, start_worker: Start
) -> None:
    async with FakeProvider(FakeConfig(latency_ms=2_000)) as fake:
        procs, proc, held = await _busy(db, fake, start_worker, grace=20)
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 40)
    assert code == 0, procs.logs()
    rows = await db.fetch(
        "SELECT q.status, q.attempts, q.lease_losses, r.attempt FROM analysis_queue q"
        " LEFT JOIN analysis_results r ON r.queue_id = q.id WHERE q.id = ANY($1::bigint[])",
        held,
    )
    # The batch in flight finished; the prefetched one never started and went back unspent.
    ended = Counter(tuple(r) for r in rows)
    assert ended == {("completed", 1, 0, 1): BATCH, ("pending", 0, 0, None): BATCH}, procs.logs()
    # Nothing was claimed after the signal.
    assert await db.fetchval("SELECT count(*) FROM analysis_queue WHERE status <> 'pending'") == 5

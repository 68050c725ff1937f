"""``connections``: how many connections a worker holds, and 200 workers on 100 connections.

A PostgreSQL with ``max_connections=100``. First one production ``Worker`` drains items (echo
provider answering after ``--delay-ms``) on a direct pool, and the connections it holds are
sampled every 20 ms (pg_stat_activity, application_name ``analysisq``). Then ``--workers``
workers (default 200, each its own pool of ``pool_size`` = 4, as 200 pods would have) try
to open their pools directly: how many get a connection before the server refuses. Then the
same workers drain a run through a real PgBouncer in transaction mode (tests/pooler.py) whose
server pool is ``--server-pool`` (default 90: 10 connections left for the operator, the
migrations and people); sampled: the server connections in use, and the workers' client
connections to the pooler (this process's sockets to its port).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections.abc import Awaitable
from typing import Any

import asyncpg
import psutil

from analysisq.db.connect import Pooler, create_pool
from analysisq.errors import DatabaseUnavailable
from analysisq.queue import runs
from analysisq.settings import Settings
from analysisq.spec import AnalysisRunSpec, parse_spec
from analysisq.worker import Worker

from .common import ROOT, Reporter, bench_database, copy_prompts, stopwatch, table

NAME = "connections"
BACKENDS = (
    "SELECT count(*) FROM pg_stat_activity"
    " WHERE datname = current_database() AND application_name = 'analysisq'"
)


def pgbouncer_class() -> Any:
    sys.path.insert(0, str(ROOT / "tests"))
    from pooler import PgBouncer

    return PgBouncer


async def sample(conn: asyncpg.Connection, work: Awaitable[Any], sql: str) -> tuple[Any, int]:
    """Run *work* while sampling ``sql`` (a count) every 20 ms; its result and the peak."""
    task = asyncio.ensure_future(work)
    peak = 0
    while not task.done():
        peak = max(peak, int(await conn.fetchval(sql)))
        await asyncio.sleep(0.02)
    return await task, peak


async def drain(url: str, n: int, pooler: Pooler, run_id: str) -> tuple[float, int]:
    """*n* workers, each with its own pool, drain *run_id*; seconds and items completed."""
    settings = Settings(database_url=url, database_pooler=pooler, poll_seconds=0.2)
    pools = [
        await create_pool(url, pooler=pooler, min_size=1, max_size=settings.pool_size)
        for _ in range(n)
    ]
    try:
        async with pools[0].acquire() as conn:
            run = await runs.get_run(conn, run_id)
        workers = [Worker(p, run, settings, name=f"w{i}", exit_when_done=True)
                   for i, p in enumerate(pools)]  # fmt: skip
        with stopwatch() as t:
            stats = await asyncio.gather(*(w.run_until_stopped() for w in workers))
        return t[0], sum(s.completed for s in stats)
    finally:
        for p in pools:
            await p.close()


async def direct_pools(url: str, n: int) -> int:
    """How many of *n* worker pools open directly before the server refuses."""
    opened: list[asyncpg.Pool] = []
    try:
        for _ in range(n):
            try:
                opened.append(await create_pool(url, min_size=1, max_size=4, timeout=5))
            except DatabaseUnavailable:
                break
        return len(opened)
    finally:
        for p in opened:
            with contextlib.suppress(Exception):
                await p.close()


def run_spec(args: argparse.Namespace, ids: list[str] | None = None) -> AnalysisRunSpec:
    target = {"name": "echo", "provider": "echo", "model": "echo-1",
              "params": {"delayMs": args.delay_ms}}  # fmt: skip
    data: dict[str, Any] = {"targets": [target], "batchSize": args.batch}
    if ids:
        data["prompts"] = {"ids": ids}
    return parse_spec(data)


async def main(args: argparse.Namespace, reporter: Reporter) -> None:
    n = 20 if args.quick else args.workers
    items = 2_000 if args.quick else args.items
    spec = run_spec(args)
    async with bench_database(NAME, max_connections=100) as db:
        reporter.header(f"connections: {n} workers, max_connections=100", db)
        conn = await asyncpg.connect(db.url)
        rows: list[list[Any]] = []
        try:
            await copy_prompts(conn, items)
            # ten batches for one worker: its steady state for about ten provider latencies
            few = run_spec(args, [f"b{i:08d}" for i in range(10 * args.batch)])
            await runs.create_run(conn, "one", few)
            await runs.fill(conn, "one", few)
            (secs, done), peak = await sample(conn, drain(db.url, 1, "none", "one"), BACKENDS)
            rows.append(["1 worker, direct", peak, "-", done, done / secs])
            fits = await direct_pools(db.url, n)
            rows.append([f"{n} worker pools, direct: pools opened", fits, "-", "-", "-"])
            bouncer = pgbouncer_class()(db.url, pool_size=args.server_pool, max_clients=5000)
            await asyncio.to_thread(bouncer.start)
            try:
                await runs.create_run(conn, "many", spec)
                await runs.fill(conn, "many", spec)
                peak_clients = 0

                async def watch_clients() -> None:
                    # the workers' client connections: this process's sockets to the pooler
                    nonlocal peak_clients
                    me = psutil.Process()
                    while True:
                        mine = sum(1 for c in me.net_connections("tcp")
                                   if c.raddr and c.raddr.port == bouncer.port)  # fmt: skip
                        peak_clients = max(peak_clients, mine)
                        await asyncio.sleep(0.1)

                watcher = asyncio.ensure_future(watch_clients())
                url = bouncer.url(db.url.rsplit("/", 1)[1])
                (secs, done), peak = await sample(conn, drain(url, n, "transaction", "many"),
                                                  BACKENDS)  # fmt: skip
                watcher.cancel()
                rows.append([f"{n} workers via PgBouncer", peak, peak_clients, done,
                             done / secs])  # fmt: skip
            finally:
                bouncer.close()
        finally:
            await conn.close()
    headers = ["case", "server connections (peak)", "client connections (peak)", "items",
               "items/s"]  # fmt: skip
    print(table(headers, rows))
    for r in rows:
        reporter.record(NAME, str(r[0]), dict(zip(headers[1:], r[1:], strict=True)),
                        params=vars(args) | {"at": time.time()}, db=db)  # fmt: skip


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=200)
    p.add_argument("--items", type=int, default=20_000, help="items of the 200-worker run")
    p.add_argument("--batch", type=int, default=5, help="batchSize of the run")
    p.add_argument("--delay-ms", type=int, default=1000, help="the echo provider's latency")
    p.add_argument("--server-pool", type=int, default=90, help="PgBouncer default_pool_size")

"""One consumer process of the ``overhead`` benchmark: analysisq, PGQueuer or procrastinate.

``python -m bench.overhead_worker SYSTEM --url URL --batch B [--run RUN]``

The process connects and sets its system up, prints ``ready``, waits for a line on standard
input (the start signal, so that interpreter start-up and connecting are not timed), drains
the queue with a no-op job, and prints one JSON line with its CPU time and job count.

- analysisq: the production ``Worker`` (the code ``analysisq worker`` runs) on a run whose
  single target uses the offline ``echo`` provider; ``batchSize`` items in flight per
  process, results written in fenced batches; exits when the run is done.
- PGQueuer: ``PgQueuer`` over one asyncpg connection, a no-op ``entrypoint``,
  ``run(batch_size=B, mode=drain)`` (its batched dequeue; exits when the queue is empty).
- procrastinate: ``App(PsycopgConnector)``, a no-op async task,
  ``run_worker_async(concurrency=B, wait=False)`` (exits when it has caught up).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import resource
import sys
import time
from typing import Any

#: The procrastinate app and task are module-level so that the parent can defer jobs of
#: the same task name; they are created on first use (the import is heavy).
_PROCRASTINATE: dict[str, Any] = {}
#: CPU seconds of this process and wall time when the start signal arrived.
_GO: dict[str, float] = {}
#: ``--profile-out``: a pyinstrument profiler started with the start signal.
_PROFILER: dict[str, Any] = {}
NOOP_TASK = "bench_noop"
NOOP_ENTRYPOINT = "bench_noop"


def procrastinate_app(url: str, pool_size: int) -> Any:
    """A procrastinate ``App`` with the no-op task registered (one per process)."""
    if "app" not in _PROCRASTINATE:
        import procrastinate

        app = procrastinate.App(
            connector=procrastinate.PsycopgConnector(
                conninfo=url, min_size=pool_size, max_size=pool_size
            )
        )

        @app.task(name=NOOP_TASK)
        async def noop() -> None:
            return None

        _PROCRASTINATE["app"] = app
        _PROCRASTINATE["task"] = noop
    return _PROCRASTINATE["app"]


async def _wait_for_go() -> None:
    print("ready", flush=True)
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    if not line:
        raise SystemExit("no start signal")
    _GO["cpu"] = time.process_time()
    _GO["wall"] = time.perf_counter()
    if "profiler" in _PROFILER:
        _PROFILER["profiler"].start()


async def run_analysisq(url: str, run_id: str, whatif: frozenset[str] = frozenset()) -> int:
    """The production worker; *whatif* names experiments of ``bench.whatif`` to apply."""
    from analysisq.db.connect import acquire, create_pool
    from analysisq.db.migrate import check_schema
    from analysisq.queue.runs import get_run
    from analysisq.settings import load_settings
    from analysisq.worker import Worker

    from .whatif import pool_options, worker_class

    settings = load_settings(database_url=url)
    try:
        pool = await create_pool(
            url,
            pooler=settings.database_pooler,
            min_size=1,
            max_size=settings.pool_size,
            **pool_options(whatif),
        )
    except TypeError:  # create_pool sets reset= itself: ``noreset`` is production already
        pool = await create_pool(
            url, pooler=settings.database_pooler, min_size=1, max_size=settings.pool_size
        )
    try:
        async with acquire(pool) as conn:
            await check_schema(conn)
            run = await get_run(conn, run_id)
        cls: type[Worker] = worker_class(whatif)
        worker = cls(pool, run, settings, exit_when_done=True)
        await _wait_for_go()
        stats = await worker.run_until_stopped()
        return int(stats.completed)
    finally:
        await pool.close()


async def run_pgqueuer(url: str, batch: int) -> int:
    from datetime import timedelta

    import asyncpg
    from pgqueuer import PgQueuer
    from pgqueuer.models import Job
    from pgqueuer.types import QueueExecutionMode

    # as analysisq's pooler mode: no statement cache behind a transaction pooler
    pooled = os.environ.get("ANALYSISQ_DATABASE_POOLER") == "transaction"
    conn = await asyncpg.connect(url, **({"statement_cache_size": 0} if pooled else {}))
    done = 0
    try:
        pgq = PgQueuer.from_asyncpg_connection(conn)

        @pgq.entrypoint(NOOP_ENTRYPOINT)
        async def noop(job: Job) -> None:
            nonlocal done
            done += 1

        await _wait_for_go()
        await pgq.run(
            batch_size=batch,
            mode=QueueExecutionMode.drain,
            dequeue_timeout=timedelta(seconds=1),
        )
    finally:
        await conn.close()
    return done


async def run_procrastinate(url: str, batch: int, pool_size: int) -> int:
    app = procrastinate_app(url, pool_size)
    async with app.open_async():
        await _wait_for_go()
        await app.run_worker_async(
            concurrency=batch, wait=False, install_signal_handlers=False, listen_notify=True
        )
    return -1  # counted in the database by the parent


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.overhead_worker")
    p.add_argument("system", choices=["analysisq", "pgqueuer", "procrastinate"])
    p.add_argument("--whatif", default="", help="analysisq: comma-separated bench.whatif names")
    p.add_argument("--url", required=True)
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--pool-size", type=int, default=4, help="procrastinate's connection pool")
    p.add_argument("--run", default="bench-overhead")
    p.add_argument("--profile-out", help="write a pyinstrument profile of the drain here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if args.profile_out:
        from pyinstrument import Profiler

        _PROFILER["profiler"] = Profiler(interval=0.0005, async_mode="disabled")
    if args.system == "analysisq":
        whatif = frozenset(w for w in args.whatif.split(",") if w)
        done = asyncio.run(run_analysisq(args.url, args.run, whatif))
    elif args.system == "pgqueuer":
        done = asyncio.run(run_pgqueuer(args.url, args.batch))
    else:
        done = asyncio.run(run_procrastinate(args.url, args.batch, args.pool_size))
    if "profiler" in _PROFILER:
        profiler = _PROFILER["profiler"]
        profiler.stop()
        with open(args.profile_out, "w", encoding="utf-8") as f:
            f.write(profiler.output_text(unicode=False, color=False, show_all=False))
    cpu_s = time.process_time() - _GO.get("cpu", 0.0)
    wall_s = time.perf_counter() - _GO.get("wall", time.perf_counter())
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(
        json.dumps(
            {
                "system": args.system,
                "done": done,
                "cpu_s": round(cpu_s, 3),
                "wall_s": round(wall_s, 3),
                "maxrss_mb": round(usage.ru_maxrss / 1024, 1),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()

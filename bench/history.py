"""``history``: does the daily run cost the same on day 30 as on day 1? And retention.

One scratch database. The same measurement of "today's run" is taken on the empty database,
after ``--days`` simulated days of finished runs (``--items`` completed items, each with a
result row, per day: the operator's daily run), after ``analysisq prune`` of everything older
than ``--retention`` days, and after another ``--retention`` simulated days with a prune each
day (the steady state of a retention policy), each prune followed by the plain ``VACUUM`` that
autovacuum would run after it (space made reusable; nothing given back to the OS). Today's run
measures: the fill of ``--today`` items (the ``fill_run`` statement), a drain of it by two
production ``Worker`` objects (echo provider, batchSize 10) in this process, the operator's
reconcile queries (``run_counts``, ``run_targets``, the run's stuck reset), ``analysisq
status`` with and without a run (``status_breakdown``), and the seed's runbook queries verbatim
(the text that tests/db/test_seed_runbook.py proves), which read the whole table. Query times
are the median of ``--repeat`` runs. Table and index sizes are reported after each phase.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib.util
import statistics
import sys
import time
from typing import Any

import asyncpg

from analysisq.db import sql
from analysisq.db.connect import create_pool
from analysisq.queue import prune, runs
from analysisq.settings import Settings
from analysisq.spec import AnalysisRunSpec, parse_spec
from analysisq.worker import Worker

from .common import ROOT, Reporter, bench_database, copy_prompts, stopwatch, table

NAME = "history"
DAY = 86_400.0
SPEC: AnalysisRunSpec = parse_spec(
    {"targets": [{"name": "echo", "provider": "echo", "model": "echo-1"}], "batchSize": 10}
)


def seed_queries() -> dict[str, str]:
    """The seed's runbook queries, verbatim, from the test that proves them."""
    sys.path.insert(0, str(ROOT / "tests"))
    path = ROOT / "tests" / "db" / "test_seed_runbook.py"
    spec = importlib.util.spec_from_file_location("bench_seed_runbook", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    names = ("SEED_STATUS", "SEED_STUCK", "SEED_FAILED", "SEED_ERRORS", "SEED_CLEANUP")
    return {n.removeprefix("SEED_").lower(): getattr(mod, n) for n in names}


async def add_day(conn: asyncpg.Connection, run_id: str, items: int, days_ago: float) -> None:
    """One finished daily run: *items* completed queue rows, each with its result."""
    when = f"now() - make_interval(secs => {days_ago * DAY})"
    await runs.create_run(conn, run_id, SPEC)
    await conn.execute(
        f"UPDATE analysis_runs SET filled_at = {when}, finished_at = {when},"
        f" created_at = {when} WHERE id = $1",
        run_id,
    )
    await conn.execute(
        "INSERT INTO analysis_queue (run_id, prompt_tracking_id, target, status, attempts,"
        " next_attempt_at, created_at, updated_at, completed_at)"
        f" SELECT $1, p.id, 'echo', 'completed', 1, NULL, {when}, {when}, {when}"
        " FROM prompts p ORDER BY p.id LIMIT $2",
        run_id,
        items,
    )
    await conn.execute(
        "INSERT INTO analysis_results (queue_id, run_id, prompt_tracking_id, target, model,"
        " response_text, parsed, tokens_in, tokens_out, latency_ms, attempt, created_at)"
        " SELECT q.id, q.run_id, q.prompt_tracking_id, q.target, 'echo-1',"
        " repeat('an answer of about a hundred characters. ', 2), '{\"score\": 3}',"
        f" 40, 25, 800, 1, {when} FROM analysis_queue q WHERE q.run_id = $1",
        run_id,
    )


async def timed_ms(conn: asyncpg.Connection, text: str, *args: Any, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        await conn.fetch(text, *args)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


async def timed_query_ms(
    conn: asyncpg.Connection, name: str, /, *, repeat: int, **values: object
) -> float:
    """``timed_ms`` of the named block ``name`` with its parameters by name."""
    q = sql.query(name)
    return await timed_ms(conn, q.text, *q.args(**values), repeat=repeat)


async def drain(url: str, run_id: str) -> float:
    settings = Settings(database_url=url, poll_seconds=0.05)
    pool = await create_pool(url, min_size=1, max_size=settings.pool_size)
    try:
        async with pool.acquire() as conn:
            run = await runs.get_run(conn, run_id)
        workers = [Worker(pool, run, settings, name=f"w{i}", exit_when_done=True)
                   for i in range(2)]  # fmt: skip
        with stopwatch() as t:
            await asyncio.gather(*(w.run_until_stopped() for w in workers))
        return t[0]
    finally:
        await pool.close()


async def today(
    conn: asyncpg.Connection, url: str, run_id: str, n: int, repeat: int
) -> dict[str, float]:
    """Fill, drain and query today's run of *n* items; it then joins the history."""
    out: dict[str, float] = {}
    await runs.create_run(conn, run_id, SPEC)
    with stopwatch() as t:
        await sql.execute(conn, "fill_run", run_id=run_id, targets=["echo"], tags=[], ids=[])
    out["fill_s"] = t[0]
    await conn.execute("ANALYZE analysis_queue")
    out["drain_items_per_s"] = n / await drain(url, run_id)
    await runs.mark_finished(conn, run_id)
    timed = functools.partial(timed_query_ms, conn, repeat=repeat)
    out["reconcile_counts_ms"] = await timed("run_counts", run_id=run_id)
    out["reconcile_targets_ms"] = await timed("run_targets", run_id=run_id)
    out["reconcile_stuck_reset_ms"] = await timed(
        "rescue_stuck", run_id=run_id, stuck_after_seconds=900.0, live_tokens=[]
    )
    out["status_run_ms"] = await timed("status_breakdown", run_id=run_id)
    out["status_all_ms"] = await timed("status_breakdown", run_id=None)
    for name, text in seed_queries().items():
        out[f"seed_{name}_ms"] = await timed_ms(conn, text, repeat=repeat)
    return out


async def sizes(conn: asyncpg.Connection) -> dict[str, float]:
    mib = 1024.0 * 1024.0
    out: dict[str, float] = {}
    for rel in ("analysis_queue", "analysis_results"):
        out[f"{rel}_rows"] = float(await conn.fetchval(f"SELECT count(*) FROM {rel}"))
        out[f"{rel}_heap_mib"] = await conn.fetchval("SELECT pg_relation_size($1)", rel) / mib
        out[f"{rel}_index_mib"] = await conn.fetchval("SELECT pg_indexes_size($1)", rel) / mib
    return out


async def main(args: argparse.Namespace, reporter: Reporter) -> None:
    n_today = args.today or (2_000 if args.quick else 20_000)
    items = args.items or (5_000 if args.quick else 200_000)
    days, keep = args.days, args.retention
    async with bench_database(NAME) as db:
        reporter.header(f"history: today's run ({n_today:,} items) against {days} days x"
                        f" {items:,} finished items, then retention {keep} d", db)  # fmt: skip
        conn = await asyncpg.connect(db.url)
        phases: dict[str, dict[str, float]] = {}
        try:
            await copy_prompts(conn, max(items, n_today))
            # today's run fills the active prompts; the history days take the first *items*
            await conn.execute("UPDATE prompts SET active = false WHERE id >"
                               " (SELECT min(id) FROM prompts) + $1 - 1", n_today)  # fmt: skip
            params = {"days": days, "items": items, "today": n_today, "retention": keep,
                      "daily_prune": args.daily_prune}  # fmt: skip

            async def phase(label: str, day: int) -> None:
                m = await today(conn, db.url, f"today-{day}", n_today, args.repeat)
                m |= await sizes(conn)
                phases[label] = m
                reporter.record(NAME, label, m, params=params, db=db)
                print(f"  {label}: fill {m['fill_s']:.2f} s, drain"
                      f" {m['drain_items_per_s']:,.0f} items/s", flush=True)  # fmt: skip

            await phase("empty", 0)
            with stopwatch() as t:
                for d in range(days):
                    await add_day(conn, f"day-{d}", items, days - d)
                    if args.daily_prune:
                        await prune.prune(conn, keep * DAY, results=args.prune_results)
                        await conn.execute("VACUUM analysis_queue, analysis_results")
                await conn.execute("VACUUM ANALYZE")
            print(f"  {days} days of history: {t[0]:.0f} s", flush=True)
            await phase(f"{days} days", 1)
            with stopwatch() as t:
                report = await prune.prune(conn, keep * DAY, results=args.prune_results)
                await conn.execute("VACUUM analysis_queue, analysis_results")
            print(f"  prune older than {keep} d: {report.queue_rows:,} queue rows,"
                  f" {report.results:,} results in {t[0]:.1f} s", flush=True)  # fmt: skip
            phases["prune"] = {"prune_s": t[0], "pruned_queue_rows": float(report.queue_rows)}
            await phase(f"{days} days, pruned to {keep} d", 2)
            for d in range(keep):
                # one more day: history ages a day, a new day lands, the daily prune runs
                await conn.execute("UPDATE analysis_runs SET finished_at = finished_at"
                                   " - interval '1 day'")  # fmt: skip
                await add_day(conn, f"later-{d}", items, 0)
                await prune.prune(conn, keep * DAY, results=args.prune_results)
                # what autovacuum does after a delete of this size: marks the space reusable
                await conn.execute("VACUUM analysis_queue, analysis_results")
            await phase(f"+{keep} days with a daily prune", 3)
        finally:
            await conn.close()
    labels = [k for k in phases if k != "prune"]
    metrics = [k for k in phases["empty"]]
    print()
    print(table(["metric", *labels],
                [[m, *(phases[lbl][m] for lbl in labels)] for m in metrics]))  # fmt: skip


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--days", type=int, default=30, help="simulated days of history")
    p.add_argument("--items", type=int, help="finished items per day (default 200000)")
    p.add_argument("--today", type=int, help="items of today's measured run (default 20000)")
    p.add_argument("--retention", type=int, default=7, help="days kept by the prune")
    p.add_argument("--prune-results", action="store_true", help="prune results too")
    p.add_argument("--repeat", type=int, default=5, help="runs per query timing (median)")
    p.add_argument(
        "--daily-prune", action="store_true", help="prune after every day (retention from day 1)"
    )

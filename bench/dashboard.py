"""``dashboard``: what one refresh of the dashboard costs the database, by run size.

For each case one run of N items is made (90 % completed with a result, 5 % failed for good,
5 % pending; one target) next to a finished run of the same size, and then timed, each the
median of five:

- the run page's six panel queries (summary, timeline, targets, errors, failed, stuck);
- the runs list, cold (every run counted) and warm (the finished run remembered);
- the operator's provider-metrics read per reconcile (``provider_calls``).

docs/dashboard.md quotes the figures. Rows are written with plain SQL so the setup is
quick; only the timed calls go through the queue layer.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Awaitable, Callable

import asyncpg

from analysisq.kube.provider_metrics import LATENCY_BOUNDS
from analysisq.queue import dashboard as panels
from analysisq.queue import monitor, runs
from analysisq.spec import parse_spec

from .common import Reporter, bench_database, copy_prompts, stopwatch, table

NAME = "dashboard"
DEFAULT_SIZES = [30_000, 300_000, 1_000_000]
QUICK_SIZES = [10_000]
SPEC = parse_spec({"targets": [{"name": "t1", "provider": "echo", "model": "echo-1"}]})


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", type=int, nargs="+", help="items per run (default 30k 300k 1M)")


async def make_run(conn: asyncpg.Connection, run_id: str, finished: bool) -> None:
    await runs.create_run(conn, run_id, SPEC)
    await runs.fill(conn, run_id, SPEC)
    await conn.execute(
        "UPDATE analysis_queue SET"
        " status = CASE WHEN id % 20 = 0 THEN 'failed' ELSE 'completed' END,"
        " completed_at = CASE WHEN id % 20 = 0 THEN NULL"
        "   ELSE now() - (id % 3600) * interval '1 second' END,"
        " error_class = CASE WHEN id % 20 = 0 THEN 'permanent' END,"
        " error_message = CASE WHEN id % 20 = 0 THEN 'HTTP 400: refused' END,"
        " next_attempt_at = NULL, attempts = 1"
        " WHERE run_id = $1 AND (id % 20 <> 1 OR $2)",
        run_id,
        finished,
    )
    await conn.execute(
        "INSERT INTO analysis_results (queue_id, run_id, prompt_tracking_id, target, model,"
        " response_text, tokens_in, tokens_out, latency_ms, attempt)"
        " SELECT id, run_id, prompt_tracking_id, target, 'echo-1', 'ok', 20, 40,"
        " 50 + id % 900, 1 FROM analysis_queue WHERE run_id = $1 AND status = 'completed'",
        run_id,
    )
    if finished:
        await runs.mark_finished(conn, run_id)


async def median_ms(call: Callable[[], Awaitable[object]], repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        with stopwatch() as t:
            await call()
        times.append(t[0] * 1000)
    return round(statistics.median(times), 1)


async def measure(conn: asyncpg.Connection, size: int) -> dict[str, float | int]:
    await conn.execute(
        "TRUNCATE analysis_results, analysis_queue, batch_submissions, run_targets, analysis_runs"
    )
    await conn.execute("TRUNCATE prompts RESTART IDENTITY CASCADE")
    await copy_prompts(conn, size)
    await make_run(conn, "old", finished=True)
    await make_run(conn, "live", finished=False)
    await conn.execute("VACUUM ANALYZE")

    async def run_page() -> None:
        await panels.run_summary(conn, "live")
        await panels.timeline(conn, "live", 60)
        await panels.target_stats(conn, "live")
        await monitor.error_summary(conn, "live", 20)
        await panels.failed_items(conn, "live", 20, 160)
        await panels.stuck_items(conn, "live", 900, 20)

    warm = panels.FinishedRuns()
    await panels.run_summaries(conn, 20, warm)
    return {
        "items_per_run": size,
        "run_page_ms": await median_ms(run_page),
        "runs_list_cold_ms": await median_ms(lambda: panels.run_summaries(conn, 20)),
        "runs_list_warm_ms": await median_ms(lambda: panels.run_summaries(conn, 20, warm)),
        "provider_metrics_ms": await median_ms(
            lambda: panels.provider_calls(conn, "live", LATENCY_BOUNDS)
        ),
    }


async def main(args: argparse.Namespace, reporter: Reporter) -> None:
    sizes = args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)
    async with bench_database(NAME) as db:
        reporter.header("dashboard: one refresh, by run size", db)
        conn = await asyncpg.connect(db.url, server_settings={"timezone": "UTC"})
        try:
            rows = []
            for size in sizes:
                m = await measure(conn, size)
                reporter.record(NAME, f"{size} items", m, db=db)
                rows.append(list(m.values()))
                print(f"  {size:,} items: {m}", flush=True)
        finally:
            await conn.close()
    headers = ["items/run", "run page ms", "runs cold ms", "runs warm ms", "metrics ms"]
    print(table(headers, rows))

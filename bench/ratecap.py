"""``ratecap``: 10k prompts through the fake provider capped at 50 req/s, 20 workers.

The fake provider runs in its own process with its own rate cap (``rate_limit_rps`` = R: a
429 with Retry-After above it) and a small latency. The run's only target points at it with
``rateLimit.requestsPerSecond: R``, and 20 production worker processes
(``analysisq worker --run RUN --exit-when-done``) drain it. Timed: from starting the
workers until the last of them has exited with every item terminal, against the bound
N/R seconds (DESIGN: <= 1.1 x N/R, i.e. 220 s for 10,000 prompts at 50 req/s). The provider's
own counters give the peak requests in any 10 s and 1 s window and the 429s it sent.
``--prompts`` shrinks the run for a quick check (``--quick`` = 1,000 prompts).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg

from analysisq.queue import runs
from analysisq.spec import parse_spec

from .common import (
    Reporter,
    bench_database,
    copy_prompts,
    spawn_workers,
    stop_processes,
    table,
)
from .fake_server import FakeServer
from .waits import WaitSampler

NAME = "ratecap"
RUN_ID = "bench-ratecap"


async def run_counts(url: str) -> dict[str, Any]:
    conn = await asyncpg.connect(url)
    try:
        c = await runs.counts(conn, RUN_ID)
        row = await conn.fetchrow(
            "SELECT count(*) AS results, count(DISTINCT queue_id) AS distinct_items,"
            " max(attempt) AS max_attempt,"
            " extract(epoch FROM max(created_at) - min(created_at)) AS first_to_last_s"
            " FROM analysis_results WHERE run_id = $1",
            RUN_ID,
        )
        deferrals = await conn.fetchval(
            "SELECT coalesce(sum(deferrals), 0) FROM analysis_queue WHERE run_id = $1", RUN_ID
        )
    finally:
        await conn.close()
    assert row is not None
    return c.as_dict() | dict(row) | {"deferrals": int(deferrals)}


async def main(args: argparse.Namespace, reporter: Reporter) -> None:
    prompts = 1000 if args.quick and args.prompts is None else (args.prompts or 10_000)
    bound = prompts / args.rps
    async with bench_database(NAME) as db:
        reporter.header(
            f"ratecap: {prompts:,} prompts, provider capped at {args.rps:g} req/s,"
            f" {args.workers} worker processes",
            db,
        )
        logdir = Path(tempfile.mkdtemp(prefix="analysisq-bench-ratecap-"))
        fake_cfg = {
            "rate_limit_rps": args.rps,
            "latency_ms": args.latency_ms,
            "jitter_ms": args.latency_ms / 2,
            "retry_after_s": 1.0,
        }
        with FakeServer(fake_cfg, log_path=str(logdir / "fake.log")) as fake:
            spec = parse_spec(
                {
                    "targets": [
                        {
                            "name": "fake",
                            "provider": "openai",
                            "model": "fake-model",
                            "endpoint": fake.url,
                            "rateLimit": {"requestsPerSecond": args.rps},
                        }
                    ],
                    "workers": args.workers,
                }
            )
            conn = await asyncpg.connect(db.url)
            try:
                await copy_prompts(conn, prompts)
                await runs.create_run(conn, RUN_ID, spec)
                await runs.fill(conn, RUN_ID, spec)
            finally:
                await conn.close()
            started = time.perf_counter()
            procs = spawn_workers(db.url, RUN_ID, args.workers, logdir / "workers.log")
            try:
                async with WaitSampler(db.url) as waits:
                    deadline = started + max(3 * bound, 120)
                    while any(p.poll() is None for p in procs):
                        if time.perf_counter() > deadline:
                            raise RuntimeError(
                                f"workers still running after 3x the bound; {logdir}"
                            )
                        await asyncio.sleep(0.2)
            finally:
                stop_processes(procs)
            wall = time.perf_counter() - started
            stats = fake.stats(histogram=True)
        counts = await run_counts(db.url)
    ratio = wall / bound
    codes = [p.returncode for p in procs]
    metrics = {
        "prompts": prompts,
        "rps": args.rps,
        "workers": args.workers,
        "wall_s": round(wall, 1),
        "bound_s": round(bound, 1),
        "ratio_to_bound": round(ratio, 3),
        "target_ratio": 1.1,
        "verdict": "met" if ratio <= 1.1 and counts["completed"] == prompts else "MISSED",
        "provider_requests": stats["requests"],
        "provider_429": stats["by_status"].get("429", 0),
        "provider_by_status": stats["by_status"],
        "provider_max_requests_10s": stats["max_requests_10s"],
        "provider_max_requests_1s": stats["max_requests_1s"],
        "provider_first_to_last_request_s": stats["elapsed_s"],
        **idle_seconds(stats["requests_per_second"], args.rps),
        **waits.figures(),
        "prompts_completed_more_than_once": stats["prompts_completed_more_than_once"],
        "worker_exit_codes": sorted(set(codes)),
        **{f"run_{k}": v for k, v in counts.items()},
    }
    print()
    print(
        table(
            ["figure", "value"],
            [
                ["wall time (workers started -> all exited)", f"{wall:.1f} s"],
                ["bound N/R", f"{bound:.1f} s"],
                ["wall / bound (target <= 1.1)", f"{ratio:.3f} ({metrics['verdict']})"],
                ["provider: first -> last request", f"{stats['elapsed_s']:.1f} s"],
                ["provider: requests", stats["requests"]],
                ["provider: 429 sent", metrics["provider_429"]],
                ["provider: max requests in any 10 s", stats["max_requests_10s"]],
                ["provider: max requests in any 1 s", stats["max_requests_1s"]],
                [
                    "provider: seconds with no request / under half the cap",
                    f"{metrics['provider_idle_s']} / {metrics['provider_under_half_s']}",
                ],
                ["prompts answered more than once", stats["prompts_completed_more_than_once"]],
                ["items completed / failed", f"{counts['completed']} / {counts['failed']}"],
                ["results / distinct items", f"{counts['results']} / {counts['distinct_items']}"],
                ["429 deferrals recorded on items", counts["deferrals"]],
                ["database: active backends waiting for a lock", metrics["db_lock_waiting"]],
                ["database: active backends by wait", metrics["db_active_by_wait"]],
                ["worker exit codes", ", ".join(str(c) for c in sorted(set(codes)))],
            ],
        )
    )
    print(f"logs: {logdir}")
    reporter.record(
        NAME,
        f"{prompts} prompts at {args.rps:g} req/s",
        metrics,
        db=db,
        params={
            "prompts": prompts,
            "rps": args.rps,
            "workers": args.workers,
            "latency_ms": args.latency_ms,
        },
    )


def idle_seconds(per_second: list[list[int]], rps: float) -> dict[str, int]:
    """Seconds between the first and the last request in which the pool's schedule lay idle:
    with no request at all, and with fewer than half the cap's (a request refused with a 429
    counts: it used a slot, the time it cost shows in the 429s, not here)."""
    counts = dict((int(sec), int(n)) for sec, n in per_second)
    if not counts:
        return {"provider_idle_s": 0, "provider_under_half_s": 0}
    span = range(min(counts), max(counts) + 1)
    return {
        "provider_idle_s": sum(1 for sec in span if sec not in counts),
        "provider_under_half_s": sum(1 for sec in span if counts.get(sec, 0) < rps / 2),
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--prompts", type=int, default=None, help="prompts in the run (default 10000; --quick 1000)"
    )
    p.add_argument(
        "--rps",
        type=float,
        default=50.0,
        help="the provider's cap and the target's rateLimit.requestsPerSecond (default 50)",
    )
    p.add_argument("--workers", type=int, default=20, help="worker processes (default 20)")
    p.add_argument(
        "--latency-ms",
        type=float,
        default=200.0,
        help="mean provider latency, jitter +-50%% (default 200)",
    )

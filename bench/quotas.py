"""``quotas``: two runs on one rate pool, each with its own worker processes, measured at the
fake provider over minutes (the tier tests hold the same bounds over ~20 s).

Both runs' targets name the pool ``bench-key`` with ``tokensPerMinute`` T (and, with
``--rps``, ``requestsPerSecond``); the fake provider reports each answer's usage as
``--usage-factor`` x the estimate analysisq reserved (1.5: a tokenizer counting 50% more
than the four-characters rule; 0.5: half). Reported: the provider's peak tokens in any 60 s
window against T (target: within 10%), its peak requests in any 10 s window against 10 x R,
and that each prompt was answered once. The run is sized to last about ``--seconds``.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg

from analysisq.queue import runs
from analysisq.spec import parse_spec
from analysisq.tokens import estimate

from .common import Reporter, bench_database, copy_prompts, spawn_workers, stop_processes, table
from .fake_server import FakeServer

NAME = "quotas"
MAX_TOKENS = 200


def run_spec(url: str, run: str, args: argparse.Namespace) -> Any:
    limit: dict[str, Any] = {"tokensPerMinute": args.tpm, "pool": "bench-key"}
    if args.rps:
        limit["requestsPerSecond"] = args.rps
    return parse_spec(
        {
            "targets": [
                {"name": f"fake-{run}", "provider": "openai", "model": "fake-model",
                 "endpoint": url, "rateLimit": limit, "params": {"max_tokens": MAX_TOKENS}}
            ],
            "prompts": {"tags": [run]},
            "workers": args.workers,
        }
    )  # fmt: skip


async def main(args: argparse.Namespace, reporter: Reporter) -> None:
    seconds = 20.0 if args.quick else args.seconds
    prompt = "Benchmark prompt 0: summarise item 0. Run a"
    per_request = (len(prompt) // 4 + MAX_TOKENS) * args.usage_factor
    per_run = math.ceil(args.tpm / 60 * seconds / per_request / 2)
    async with bench_database(NAME) as db:
        reporter.header(
            f"quotas: 2 runs x {per_run} prompts on one pool of {args.tpm:,} tokens/min,"
            f" usage {args.usage_factor:g} x the estimate, {args.workers} workers per run",
            db,
        )
        logdir = Path(tempfile.mkdtemp(prefix="analysisq-bench-quotas-"))
        cfg = {"usage_factor": args.usage_factor, "latency_ms": args.latency_ms}
        with FakeServer(cfg, log_path=str(logdir / "fake.log")) as fake:
            conn = await asyncpg.connect(db.url)
            try:
                for run in ("a", "b"):
                    await copy_prompts(conn, per_run, prefix=run)
                    # each run its own texts: the provider counts a text answered twice
                    await conn.execute(
                        "UPDATE prompts SET tags = ARRAY[$1], text = text || ' Run ' || $1"
                        " WHERE external_id LIKE $1 || '%'",
                        run,
                    )
                    spec = run_spec(fake.url, run, args)
                    await runs.create_run(conn, f"bench-quotas-{run}", spec)
                    await runs.fill(conn, f"bench-quotas-{run}", spec)
                est = estimate(spec.targets[0], prompt).total
            finally:
                await conn.close()
            started = time.perf_counter()
            procs = [
                p
                for run in ("a", "b")
                for p in spawn_workers(db.url, f"bench-quotas-{run}", args.workers,
                                       logdir / f"workers-{run}.log")
            ]  # fmt: skip
            try:
                while any(p.poll() is None for p in procs):
                    if time.perf_counter() - started > 4 * seconds + 60:
                        raise RuntimeError(f"workers still running; {logdir}")
                    await asyncio.sleep(0.5)
            finally:
                stop_processes(procs)
            wall = time.perf_counter() - started
            stats = fake.stats()
    ratio = stats["max_tokens_60s"] / args.tpm
    metrics = {
        "prompts": 2 * per_run,
        "tpm": args.tpm,
        "rps": args.rps,
        "usage_factor": args.usage_factor,
        "estimate_tokens": est,
        "wall_s": round(wall, 1),
        "provider_completions": stats["completions"],
        "provider_tokens": stats["tokens"],
        "provider_max_tokens_60s": stats["max_tokens_60s"],
        "provider_max_tokens_10s": stats["max_tokens_10s"],
        "provider_max_requests_10s": stats["max_requests_10s"],
        "max_tokens_60s_to_tpm": round(ratio, 3),
        "prompts_completed_more_than_once": stats["prompts_completed_more_than_once"],
        "verdict": "met"
        if ratio <= 1.1
        and stats["elapsed_s"] >= 60
        and not stats["prompts_completed_more_than_once"]
        else "MISSED",
    }
    print()
    print(
        table(
            ["figure", "value"],
            [
                ["wall time", f"{wall:.1f} s"],
                ["answers / tokens reported", f"{stats['completions']} / {stats['tokens']:,}"],
                ["estimate per request / usage factor", f"{est} / {args.usage_factor:g}"],
                ["peak tokens in any 60 s (limit)", f"{stats['max_tokens_60s']:,} ({args.tpm:,})"],
                ["peak / limit (target <= 1.1)", f"{ratio:.3f} ({metrics['verdict']})"],
                ["peak requests in any 10 s", stats["max_requests_10s"]],
                ["prompts answered more than once", stats["prompts_completed_more_than_once"]],
            ],
        )
    )
    reporter.record(
        NAME,
        f"2 runs on one pool, {args.tpm} tokens/min, usage x{args.usage_factor:g}",
        metrics,
        db=db,
        params={"tpm": args.tpm, "rps": args.rps, "usage_factor": args.usage_factor,
                "workers": args.workers, "seconds": seconds},
    )  # fmt: skip


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tpm", type=int, default=60_000, help="the pool's tokens/min (60000)")
    p.add_argument("--rps", type=float, default=None, help="the pool's requests/s (none)")
    p.add_argument(
        "--usage-factor", type=float, default=1.5, help="usage reported / estimate (1.5)"
    )
    p.add_argument("--workers", type=int, default=4, help="worker processes per run (4)")
    p.add_argument("--seconds", type=float, default=150.0, help="about how long (150)")
    p.add_argument("--latency-ms", type=float, default=100.0, help="provider latency (100)")

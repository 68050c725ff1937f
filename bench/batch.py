"""``batch``: a run in ``mode: batch`` through the fake Batch API (target: overhead < 60 s).

``--items`` items (default 100,000) of one OpenAI target in ``mode: batch`` (batches of
``--max-requests``, default 50,000) are drained by ``--workers`` production worker processes
(``analysisq worker``); the fake provider runs in its own process and takes
``--batch-seconds`` from create to completed for every batch. Reported: the wall time, the
provider's own time (the union of every batch's ``[submitted, submitted + batch-seconds]``),
the overhead (wall minus provider time: claiming, building and uploading the JSONL,
polling, streaming and writing the results), the CPU seconds of each worker and of the fake
provider during the drain, database rows and row writes per item, and each worker's peak
RSS (sampled, and the kernel's VmHWM) while it builds and ingests 50,000-line files (target
< 150 MB).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg

from analysisq.queue import runs
from analysisq.spec import parse_spec

from .common import Reporter, bench_database, copy_prompts, spawn_workers, stop_processes, table
from .fake_server import FakeServer
from .rss import vm_hwm_mb

NAME = "batch"
OVERHEAD_TARGET_S = 60.0
RSS_TARGET_MB = 150.0
RUN = "bench-batch"
TABLES = ("analysis_queue", "analysis_results", "batch_submissions")


async def _writes(conn: asyncpg.Connection) -> int:
    rows = await conn.fetch(
        "SELECT n_tup_ins + n_tup_upd + n_tup_del AS n FROM pg_stat_user_tables"
        " WHERE relname = ANY ($1::text[])",
        list(TABLES),
    )
    return sum(int(r["n"]) for r in rows)


def _cpu_seconds(handle: Any) -> float:
    times = handle.cpu_times()
    return float(times.user + times.system)


async def drain(url: str, workers: int, logdir: Path, fake_pid: int) -> dict[str, Any]:
    """Start the workers, follow their memory and CPU until the run is done, and time it."""
    import psutil

    procs = spawn_workers(url, RUN, workers, logdir / "workers.log")
    peaks = [0.0] * workers
    hwm: list[float | None] = [None] * workers
    cpu = [0.0] * workers
    fake = psutil.Process(fake_pid)
    fake_cpu_before = _cpu_seconds(fake)
    started = time.perf_counter()
    conn = await asyncpg.connect(url)
    try:
        handles = [psutil.Process(p.pid) for p in procs]
        while any(p.poll() is None for p in procs):
            for i, h in enumerate(handles):
                with contextlib.suppress(psutil.Error):
                    peaks[i] = max(peaks[i], h.memory_info().rss / 2**20)
                    hwm[i] = vm_hwm_mb(h.pid) or hwm[i]
                    cpu[i] = _cpu_seconds(h)
            await asyncio.sleep(0.05)
            if time.perf_counter() - started > 3600:
                raise TimeoutError("the batch run did not finish within an hour")
        wall = time.perf_counter() - started
        fake_cpu = _cpu_seconds(fake) - fake_cpu_before
    finally:
        await conn.close()
        stop_processes(procs)
    return {
        "wall_s": round(wall, 2),
        # CPU seconds (user + system) of each worker (sampled until it exited: a lower
        # bound) and of the fake provider during the drain; the machine has 2 cores
        "worker_cpu_s": [round(c, 1) for c in cpu],
        "fake_cpu_s": round(fake_cpu, 1),
        "peak_rss_mb": [round(p, 1) for p in peaks],
        "vm_hwm_mb": [None if h is None else round(h, 1) for h in hwm],
        "exit_codes": [p.returncode for p in procs],
    }


def _union_seconds(starts: list[float], length: float) -> float:
    total, end = 0.0, float("-inf")
    for start in sorted(starts):
        stop = start + length
        if start > end:
            total += length
        elif stop > end:
            total += stop - end
        end = max(end, stop)
    return total


async def main(args: argparse.Namespace, reporter: Reporter) -> None:
    items = 2000 if args.quick else args.items
    max_requests = 1000 if args.quick else args.max_requests
    seconds = 2.0 if args.quick else args.batch_seconds
    async with bench_database(NAME) as db:
        reporter.header(
            f"batch: {items:,} items in mode batch, batches of {max_requests:,}, "
            f"{args.workers} workers, {seconds:g} s per batch at the fake provider",
            db,
        )
        logdir = Path(tempfile.mkdtemp(prefix="analysisq-bench-batch-"))
        with FakeServer({"batch_seconds": seconds}, log_path=str(logdir / "fake.log")) as fake:
            target = {
                "name": "cheap",
                "provider": "openai",
                "model": "fake-model",
                "endpoint": fake.url,
                "mode": "batch",
                "batch": {"maxRequests": max_requests, "pollSeconds": args.poll_seconds},
            }
            spec = parse_spec({"targets": [target], "workers": args.workers})
            conn = await asyncpg.connect(db.url)
            try:
                await copy_prompts(conn, items, text_bytes=args.prompt_bytes)
                await runs.create_run(conn, RUN, spec)
                await runs.fill(conn, RUN, spec)
                writes_before = await _writes(conn)
            finally:
                await conn.close()
            m = await drain(db.url, args.workers, logdir, fake.pid)
            stats = fake.stats()
        conn = await asyncpg.connect(db.url)
        try:
            await asyncio.sleep(1.5)  # backends report their statistics about every second
            writes = await _writes(conn) - writes_before
            counts = await runs.counts(conn, RUN)
            rows = sum([await conn.fetchval(f"SELECT count(*) FROM {t}") for t in TABLES])
            submitted = [
                r[0].timestamp()
                for r in await conn.fetch(
                    "SELECT submitted_at FROM batch_submissions WHERE submitted_at IS NOT NULL"
                )
            ]
        finally:
            await conn.close()
        provider_s = _union_seconds(submitted, seconds)
        overhead = m["wall_s"] - provider_s
        peak = max([*m["peak_rss_mb"], *(h for h in m["vm_hwm_mb"] if h is not None)])
        m |= {
            "completed": counts.completed,
            "batches": stats["batches_created"],
            "provider_s": round(provider_s, 2),
            "overhead_s": round(overhead, 2),
            "rows_per_item": round(rows / items, 3),
            "row_writes_per_item": round(writes / items, 2),
            "duplicates": stats["prompts_completed_more_than_once"],
            "overhead_verdict": "met" if overhead < OVERHEAD_TARGET_S else "MISSED",
            "rss_verdict": "met" if peak < RSS_TARGET_MB else "MISSED",
        }
        params = {
            "items": items,
            "max_requests": max_requests,
            "batch_seconds": seconds,
            "workers": args.workers,
            "poll_seconds": args.poll_seconds,
            "prompt_bytes": args.prompt_bytes,
        }
        reporter.record(NAME, "openai->fake", m, db=db, params=params)
        print()
        print(
            table(
                ["items", "batches", "completed", "wall s", "provider s", "overhead s",
                 "worker CPU s", "fake CPU s",
                 "rows/item", "row writes/item", "peak RSS MB", "VmHWM MB", "verdicts"],
                [[items, m["batches"], m["completed"], m["wall_s"], m["provider_s"],
                  m["overhead_s"], "/".join(map(str, m["worker_cpu_s"])), m["fake_cpu_s"],
                  m["rows_per_item"], m["row_writes_per_item"],
                  "/".join(map(str, m["peak_rss_mb"])), "/".join(map(str, m["vm_hwm_mb"])),
                  f"overhead {m['overhead_verdict']}, RSS {m['rss_verdict']}"]],
            )
        )  # fmt: skip
        print(f"logs: {logdir}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--items", type=int, default=100_000, help="items (default 100000)")
    p.add_argument(
        "--max-requests", type=int, default=50_000, help="batch.maxRequests (default 50000)"
    )
    p.add_argument(
        "--batch-seconds", type=float, default=20.0, help="the fake's time per batch (20)"
    )
    p.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--poll-seconds", type=float, default=1.0, help="batch.pollSeconds (1)")
    p.add_argument(
        "--prompt-bytes",
        type=int,
        default=0,
        help="pad each prompt to this many bytes (4000 with --items 50000: a 200 MB input)",
    )

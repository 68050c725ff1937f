"""``rss``: peak resident memory of one worker process during a run (target < 150 MB).

One production worker process (``analysisq worker --run RUN --exit-when-done``) drains a
run of ``--items`` items while psutil samples its RSS every 20 ms; the peak of the samples
and the kernel's high-water mark (``VmHWM``) are reported. Two cases: the offline ``echo``
provider, and the ``openai`` provider against the fake provider (in its own process), which
exercises the HTTP client as production does. ``--batch`` sets the run's batchSize.
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

NAME = "rss"
TARGET_MB = 150.0


def vm_hwm_mb(pid: int) -> float | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return None


async def sample(url: str, run_id: str, logdir: Path) -> dict[str, Any]:
    """Run one worker process on *run_id* and follow its memory until it exits."""
    import psutil

    (proc,) = spawn_workers(url, run_id, 1, logdir / f"{run_id}.log")
    peak = 0.0
    hwm: float | None = None
    samples = 0
    started = time.perf_counter()
    try:
        ps = psutil.Process(proc.pid)
        while proc.poll() is None:
            with contextlib.suppress(psutil.Error):
                peak = max(peak, ps.memory_info().rss / 1024 / 1024)
                hwm = vm_hwm_mb(proc.pid) or hwm
                samples += 1
            await asyncio.sleep(0.02)
            if time.perf_counter() - started > 600:
                raise RuntimeError(f"worker still running after 600 s; see {logdir}")
    finally:
        stop_processes([proc])
    return {
        "peak_rss_mb": round(peak, 1),
        "vm_hwm_mb": None if hwm is None else round(hwm, 1),
        "samples": samples,
        "wall_s": round(time.perf_counter() - started, 1),
        "exit_code": proc.returncode,
    }


async def main(args: argparse.Namespace, reporter: Reporter) -> None:
    items = 1000 if args.quick else args.items
    async with bench_database(NAME) as db:
        reporter.header(f"rss: one worker process draining {items:,} items", db)
        logdir = Path(tempfile.mkdtemp(prefix="analysisq-bench-rss-"))
        conn = await asyncpg.connect(db.url)
        try:
            await copy_prompts(conn, items)
        finally:
            await conn.close()
        rows = []
        with FakeServer({"latency_ms": 5.0}, log_path=str(logdir / "fake.log")) as fake:
            cases = {
                "echo": {"name": "echo", "provider": "echo", "model": "echo-1"},
                "openai->fake": {
                    "name": "fake",
                    "provider": "openai",
                    "model": "fake-model",
                    "endpoint": fake.url,
                },
            }
            for i, (label, target) in enumerate(cases.items()):
                run_id = f"bench-rss-{i}"
                spec = parse_spec({"targets": [target], "batchSize": args.batch})
                conn = await asyncpg.connect(db.url)
                try:
                    await runs.create_run(conn, run_id, spec)
                    await runs.fill(conn, run_id, spec)
                finally:
                    await conn.close()
                m = await sample(db.url, run_id, logdir)
                conn = await asyncpg.connect(db.url)
                try:
                    m["completed"] = (await runs.counts(conn, run_id)).completed
                finally:
                    await conn.close()
                peak = max(m["peak_rss_mb"], m["vm_hwm_mb"] or 0)
                m["verdict"] = "met" if peak < TARGET_MB else "MISSED"
                rows.append(
                    [
                        label,
                        items,
                        args.batch,
                        m["completed"],
                        m["peak_rss_mb"],
                        m["vm_hwm_mb"],
                        f"< {TARGET_MB:g} MB",
                        m["verdict"],
                    ]
                )
                reporter.record(NAME, label, m, db=db, params={"items": items, "batch": args.batch})
        print()
        print(
            table(
                [
                    "provider",
                    "items",
                    "batchSize",
                    "completed",
                    "peak RSS MB (sampled)",
                    "VmHWM MB",
                    "target",
                    "verdict",
                ],
                rows,
            )
        )
        print(f"logs: {logdir}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--items", type=int, default=5000, help="items per case (default 5000)")
    p.add_argument("--batch", type=int, default=5, help="the run's batchSize (default 5)")

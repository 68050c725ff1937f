"""``recovery``: kill -9 of a worker mid-run; how long until its items are back and done.

Two production worker processes drain a run whose echo target sleeps ``--delay-ms`` per
item (so that items are in flight when the kill lands). A few seconds in, one worker gets
SIGKILL. The items it held at that moment are followed in the database: "back" when none
of them is still ``processing`` under the dead worker (the survivor's stuck-item reset,
every lease period, requeued them), "done" when all of them are completed. A requeued item
waits behind the items still pending (the reset sets ``next_attempt_at = now()``), so
"done" includes the survivor's remaining backlog: the default ``--items`` is sized so that
the survivor has drained the rest of the run before the lease runs out. The run must end
with every item completed and exactly one result per item (results = distinct queue ids).
DESIGN target: recovery < 2 minutes, no duplicate result. Measured for each ``--lease``
(default 30 s and the spec default 60 s).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg

from analysisq.queue import runs
from analysisq.spec import parse_spec

from .common import BenchDB, Reporter, bench_database, copy_prompts, spawn_workers, stop_processes
from .common import table as md_table

NAME = "recovery"
TARGET_S = 120.0


async def _held_by(conn: asyncpg.Connection, run_id: str, owner: str) -> list[int]:
    rows = await conn.fetch(
        "SELECT id FROM analysis_queue WHERE run_id = $1 AND status = 'processing'"
        " AND lease_owner = $2",
        run_id,
        owner,
    )
    return [r[0] for r in rows]


async def measure(
    db: BenchDB, lease: int, args: argparse.Namespace, logdir: Path
) -> dict[str, Any]:
    run_id = f"bench-recovery-{lease}"
    spec = parse_spec(
        {
            "targets": [
                {
                    "name": "echo",
                    "provider": "echo",
                    "model": "echo-1",
                    "params": {"delayMs": args.delay_ms},
                }
            ],
            "leaseSeconds": lease,
            "workers": 2,
        }
    )
    conn = await asyncpg.connect(db.url)
    try:
        await runs.create_run(conn, run_id, spec)
        await runs.fill(conn, run_id, spec)
        procs = spawn_workers(db.url, run_id, 2, logdir / f"workers-{lease}.log")
        victim, survivor = procs
        owner = f"{socket.gethostname()}:{victim.pid}"
        try:
            # let both workers reach a steady state, then kill one that holds items
            started = time.monotonic()
            while True:
                elapsed = time.monotonic() - started
                if elapsed >= args.kill_after_s and await _held_by(conn, run_id, owner):
                    break
                if victim.poll() is not None or elapsed > 60:
                    log = (logdir / f"workers-{lease}.log").read_text()[-1500:]
                    raise RuntimeError(f"worker {owner} never held items; its log ends:\n{log}")
                await asyncio.sleep(0.1)
            t_kill: datetime = await conn.fetchval("SELECT clock_timestamp()")
            os.kill(victim.pid, signal.SIGKILL)
            victim.wait()
            lost = await _held_by(conn, run_id, owner)
            back_s = done_s = None
            limit = time.monotonic() + 4 * lease + 60
            while done_s is None and time.monotonic() < limit:
                row = await conn.fetchrow(
                    "SELECT count(*) FILTER (WHERE status = 'processing' AND lease_owner = $2)"
                    " AS still_dead, count(*) FILTER (WHERE status = 'completed') AS completed,"
                    " extract(epoch FROM clock_timestamp() - $3::timestamptz) AS t"
                    " FROM analysis_queue WHERE id = ANY($1::bigint[])",
                    lost,
                    owner,
                    t_kill,
                )
                assert row is not None
                if back_s is None and row["still_dead"] == 0:
                    back_s = float(row["t"])
                if row["completed"] == len(lost):
                    done_s = float(row["t"])
                await asyncio.sleep(0.25)
            # the survivor exits once every item is terminal
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(survivor.wait, 4 * lease + 120)
        finally:
            stop_processes(procs)
        c = await runs.counts(conn, run_id)
        check = await conn.fetchrow(
            "SELECT count(*) AS results, count(DISTINCT queue_id) AS distinct_items,"
            " count(DISTINCT (prompt_tracking_id, target)) AS distinct_prompt_targets"
            " FROM analysis_results WHERE run_id = $1",
            run_id,
        )
        extra = await conn.fetchrow(
            "SELECT max(attempts) AS max_attempts, sum(lease_losses) AS lease_losses"
            " FROM analysis_queue WHERE run_id = $1",
            run_id,
        )
    finally:
        await conn.close()
    assert check is not None and extra is not None
    ok = (
        c.completed == c.total
        and check["results"]
        == check["distinct_items"]
        == check["distinct_prompt_targets"]
        == c.completed
    )
    return {
        "lease_s": lease,
        "items": c.total,
        "lost_items": len(lost),
        "back_s": None if back_s is None else round(back_s, 1),
        "done_s": None if done_s is None else round(done_s, 1),
        "completed": c.completed,
        "failed": c.failed_for_good,
        "results": check["results"],
        "distinct_items": check["distinct_items"],
        "max_attempts": extra["max_attempts"],
        "lease_losses": extra["lease_losses"],
        "survivor_exit": survivor.returncode,
        "invariants": "ok" if ok else "VIOLATED",
        "verdict": "met" if ok and done_s is not None and done_s < TARGET_S else "MISSED",
    }


async def main(args: argparse.Namespace, reporter: Reporter) -> None:
    leases = [10] if args.quick and not args.lease else (args.lease or [30, 60])
    async with bench_database(NAME) as db:
        reporter.header("recovery: kill -9 of one of two workers mid-run", db)
        conn = await asyncpg.connect(db.url)
        try:
            await copy_prompts(conn, args.items)
        finally:
            await conn.close()
        logdir = Path(tempfile.mkdtemp(prefix="analysisq-bench-recovery-"))
        rows = []
        for lease in leases:
            m = await measure(db, lease, args, logdir)
            print(
                f"  lease {lease} s: back after {m['back_s']} s, done after {m['done_s']} s",
                flush=True,
            )
            reporter.record(
                NAME,
                f"lease {lease} s",
                m,
                db=db,
                params={
                    "items": args.items,
                    "delay_ms": args.delay_ms,
                    "kill_after_s": args.kill_after_s,
                },
            )
            rows.append(
                [
                    f"{lease} s",
                    m["lost_items"],
                    m["back_s"],
                    m["done_s"],
                    f"{m['results']} / {m['distinct_items']} / {m['completed']}",
                    m["max_attempts"],
                    m["invariants"],
                    m["verdict"],
                ]
            )
        print()
        print(
            md_table(
                [
                    "lease",
                    "items lost",
                    "back after s",
                    "done after s",
                    "results / distinct / completed",
                    "max attempts",
                    "invariants",
                    "< 2 min",
                ],
                rows,
            )
        )
        print(f"logs: {logdir}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--lease",
        type=int,
        action="append",
        help="lease seconds (repeatable; default 30 and 60; --quick 10)",
    )
    p.add_argument("--items", type=int, default=600, help="items in each run (default 600)")
    p.add_argument(
        "--delay-ms", type=float, default=200.0, help="echo target's delay per item (default 200)"
    )
    p.add_argument(
        "--kill-after-s",
        type=float,
        default=5.0,
        help="seconds after the start before the kill (default 5)",
    )

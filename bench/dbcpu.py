"""``dbcpu``: the database server's CPU per item of the worker's batch statement, alone.

One connection drains a queue of no-op items through ``analysisq_complete_and_claim`` as a
worker does (each call writes the answers of the batch it claimed before and claims the
next), and the CPU of its server process is read from ``/proc`` around the drain:
no worker Python, no second connection, no other system's rounds, so the server's own cost
per item is what is left. Cases run in alternating rounds on copies of one scratch database:

- ``current``: the function as migrated;
- ``two-updates``: the function of migration 0010, which wrote the queue in two UPDATEs
  (answers, then claims), re-created in its copy (``--cases`` selects).

Printed per case: server CPU ms per item (median of the rounds, and each round) and WAL
bytes per item. CPU time on a shared machine swells with the load; compare cases of one run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import asyncpg

from analysisq.queue import runs
from analysisq.spec import parse_spec

from .common import ROOT, Reporter, bench_database, copy_prompts, server_cpu_s, table

NAME = "dbcpu"
RUN = "bench-dbcpu"
SPEC = parse_spec({"targets": [{"name": "echo", "provider": "echo", "model": "echo-1"}]})
CALL = (
    "SELECT written, id, claim_token FROM analysisq_complete_and_claim("
    "$1::bigint[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::integer[],"
    " $7::integer[], $8::double precision[], false, $9::text, $10::bigint, 'w1', 60.0, 1,"
    " '{}'::text[])"
)
MARK = "CREATE OR REPLACE FUNCTION analysisq_complete_and_claim("


def _function_of(migration: str) -> str:
    """The complete-and-claim function as a migration created it."""
    text = (ROOT / "sql" / "migrations" / migration).read_text(encoding="utf-8")
    return text[text.index(MARK) :]


#: Case -> SQL run in its copy of the database before the rounds.
CASES: dict[str, str] = {
    "current": "",
    "two-updates": _function_of("0010_rate_slot_claim.sql"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--items", type=int, default=10_000, help="items per round (10,000)")
    p.add_argument("--rounds", type=int, default=5, help="rounds per case (5)")
    p.add_argument("--batch", type=int, default=20, help="items per call (20: prefetch x 10)")
    p.add_argument("--cases", nargs="+", choices=sorted(CASES), default=sorted(CASES))


async def drain(url: str, items: int, batch: int) -> tuple[float, float]:
    """Fill the queue, drain it on a fresh connection; (server CPU s, WAL bytes)."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "TRUNCATE analysis_results, analysis_queue, batch_submissions, run_targets,"
            " analysis_runs"
        )
        await runs.create_run(conn, RUN, SPEC)
        await runs.fill(conn, RUN, SPEC)
        await conn.execute("VACUUM ANALYZE")
    finally:
        await conn.close()
    conn = await asyncpg.connect(url)
    try:
        stmt = await conn.prepare(CALL)
        await stmt.fetch([], [], [], [], [], [], [], [], RUN, 0)  # the plan, out of the count
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        lsn0 = await conn.fetchval("SELECT pg_current_wal_insert_lsn()")
        before = server_cpu_s(pid)
        held: list[Any] = []
        written = 0
        while True:
            ids = [r["id"] for r in held]
            n = len(ids)
            rows = await stmt.fetch(
                ids,
                [r["claim_token"] for r in held],
                ["echo-1"] * n,
                [f"answer {i}" for i in ids],
                [f'{{"ok": true, "n": {i}}}' for i in ids],
                [12] * n,
                [7] * n,
                [0.5] * n,
                RUN,
                batch,
            )
            written += sum(1 for r in rows if r["written"])
            held = [r for r in rows if not r["written"]]
            if not held:
                break
        cpu = server_cpu_s(pid) - before
        wal = await conn.fetchval("SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), $1)", lsn0)
    finally:
        await conn.close()
    if written != items:
        raise RuntimeError(f"dbcpu: {written} of {items} items written")
    return cpu, float(wal)


async def main(args: argparse.Namespace, reporter: Reporter) -> None:
    items = 1_000 if args.quick else args.items
    rounds = 1 if args.quick else args.rounds
    async with bench_database(NAME) as db:
        reporter.header(f"dbcpu: server CPU per item, one connection, {items:,} items", db)
        conn = await asyncpg.connect(db.url)
        try:
            await copy_prompts(conn, items)
        finally:
            await conn.close()
        base, _, name = db.url.rpartition("/")
        urls: dict[str, str] = {}
        admin = await asyncpg.connect(f"{base}/postgres")
        try:
            for case in args.cases:
                copy = f"{name}_{case.replace('-', '_')}"
                await admin.execute(f'DROP DATABASE IF EXISTS "{copy}"')
                await admin.execute(f'CREATE DATABASE "{copy}" TEMPLATE "{name}"')
                urls[case] = f"{base}/{copy}"
                if CASES[case]:
                    c = await asyncpg.connect(urls[case])
                    try:
                        await c.execute(CASES[case])
                    finally:
                        await c.close()
            cpu: dict[str, list[float]] = {c: [] for c in urls}
            wal: dict[str, list[float]] = {c: [] for c in urls}
            for rnd in range(rounds):
                order = list(urls)[rnd % len(urls) :] + list(urls)[: rnd % len(urls)]
                for case in order:
                    t0 = time.perf_counter()
                    seconds, wal_bytes = await drain(urls[case], items, args.batch)
                    cpu[case].append(seconds / items * 1000)
                    wal[case].append(wal_bytes / items)
                    print(
                        f"  round {rnd + 1} {case:<12} {cpu[case][-1]:.4f} ms/item"
                        f"  ({time.perf_counter() - t0:.1f} s)",
                        flush=True,
                    )
        finally:
            for copy_url in urls.values():
                await admin.execute(f'DROP DATABASE IF EXISTS "{copy_url.rpartition("/")[2]}"')
            await admin.close()
        rows = []
        for case in urls:
            metrics = {
                "cpu_ms_per_item": round(statistics.median(cpu[case]), 4),
                "rounds_cpu_ms_per_item": [round(x, 4) for x in cpu[case]],
                "wal_bytes_per_item": round(statistics.median(wal[case])),
            }
            params = {"items": items, "rounds": rounds, "batch": args.batch}
            reporter.record(NAME, case, metrics, params=params, db=db)
            rows.append(
                [
                    case,
                    metrics["cpu_ms_per_item"],
                    ", ".join(f"{x:.3f}" for x in cpu[case]),
                    metrics["wal_bytes_per_item"],
                ]
            )
    print()
    print(table(["case", "server CPU ms/item", "rounds", "WAL bytes/item"], rows))

"""``params``: the Python CPU that named SQL parameters add to a hot call (the claim).

``analysisq.db.sql`` compiles each block once to ``$N`` text and a tuple of names; a call
binds its keyword values in that order. This times the claim (``complete_and_claim``, 15
parameters, the worker's statement per batch) both ways, so the binding's cost is seen next
to what the call costs anyway:

- ``bind``: Python alone, a connection whose ``fetch`` returns at once: the values passed
  positionally as before (``conn.fetch(text, *values)``) against by name
  (``sql.fetch(conn, "complete_and_claim", **values)``), in ns per call (best of 5 rounds);
- ``claim``: the real statement on a scratch database (an empty claim: the queue holds
  nothing claimable, so the server's work is the same every call), CPU seconds of this
  process per call (``time.process_time``), both ways in alternating rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, cast

import asyncpg

from analysisq.db import sql
from analysisq.queue import runs
from analysisq.spec import parse_spec

from .common import Reporter, bench_database, table

NAME = "params"
SPEC = parse_spec({"targets": [{"name": "t1", "provider": "echo", "model": "echo-1"}]})
RESULT_COLUMNS = ("ids", "tokens", "models", "response_texts", "parsed", "tokens_in")
#: The claim as the worker sends it with no answers to write.
VALUES: dict[str, object] = {
    **{column: [] for column in (*RESULT_COLUMNS, "tokens_out", "latency_ms")},
    "via_batch": False,
    "run_id": "bench-params",
    "limit": 10,
    "worker": "w",
    "lease_seconds": 60.0,
    "max_suspects": None,
    "skip_targets": [],
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calls", type=int, help="calls per round (default 200,000 bind, 2,000 claim)")


class _Instant:
    """A connection whose ``fetch`` costs nothing: what is left is the caller's binding."""

    def fetch(self, text: str, *args: object) -> Any:
        return args


def bind_ns(calls: int) -> dict[str, float]:
    q = sql.query("complete_and_claim")
    conn = _Instant()
    # not an Executor (its fetch returns at once, no awaitable): only the binding is timed
    executor = cast(sql.Executor, conn)
    ordered = q.args(**VALUES)
    best: dict[str, float] = {"positional_ns": float("inf"), "named_ns": float("inf")}
    for _ in range(5):
        start = time.perf_counter_ns()
        for _ in range(calls):
            conn.fetch(q.text, *ordered)
        best["positional_ns"] = min(best["positional_ns"], (time.perf_counter_ns() - start) / calls)
        start = time.perf_counter_ns()
        for _ in range(calls):
            sql.fetch(executor, "complete_and_claim", **VALUES)
        best["named_ns"] = min(best["named_ns"], (time.perf_counter_ns() - start) / calls)
    return {k: round(v) for k, v in best.items()}


async def claim_cpu_us(conn: asyncpg.Connection, calls: int) -> dict[str, float]:
    q = sql.query("complete_and_claim")
    ordered = q.args(**VALUES)
    cpu: dict[str, list[float]] = {"positional": [], "named": []}
    wall: dict[str, list[float]] = {"positional": [], "named": []}
    for _ in range(3):
        for way in ("positional", "named"):
            start, start_wall = time.process_time(), time.perf_counter()
            for _ in range(calls):
                if way == "positional":
                    await conn.fetch(q.text, *ordered)
                else:
                    await sql.fetch(conn, "complete_and_claim", **VALUES)
            cpu[way].append((time.process_time() - start) / calls * 1e6)
            wall[way].append((time.perf_counter() - start_wall) / calls * 1e6)
    return {
        "positional_cpu_us": round(statistics.median(cpu["positional"]), 1),
        "named_cpu_us": round(statistics.median(cpu["named"]), 1),
        "positional_wall_us": round(statistics.median(wall["positional"]), 1),
        "named_wall_us": round(statistics.median(wall["named"]), 1),
    }


async def main(args: argparse.Namespace, reporter: Reporter) -> None:
    bind_calls = args.calls or (20_000 if args.quick else 200_000)
    claim_calls = args.calls or (200 if args.quick else 2_000)
    async with bench_database(NAME) as db:
        reporter.header("params: named parameters on the claim", db)
        bind = bind_ns(bind_calls)
        reporter.record(NAME, "bind", bind, params={"calls": bind_calls})
        print(f"  bind: {bind}", flush=True)
        conn = await asyncpg.connect(db.url)
        try:
            await runs.create_run(conn, "bench-params", SPEC)
            claim = await claim_cpu_us(conn, claim_calls)
        finally:
            await conn.close()
        reporter.record(NAME, "claim", claim, params={"calls": claim_calls}, db=db)
        print(f"  claim: {claim}", flush=True)
    print(
        table(
            ["call", "positional", "named", "unit"],
            [
                ["bind (Python only)", bind["positional_ns"], bind["named_ns"], "ns/call"],
                ["claim, CPU", claim["positional_cpu_us"], claim["named_cpu_us"], "µs/call"],
                ["claim, wall", claim["positional_wall_us"], claim["named_wall_us"], "µs/call"],
            ],
        )
    )

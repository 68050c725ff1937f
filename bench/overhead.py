"""``overhead``: queue overhead with a no-op job, analysisq vs PGQueuer vs procrastinate.

One PostgreSQL, one database holding all three schemas (each installed by its own tool).
Each round empties every queue, enqueues ``--items`` jobs for one system (not timed),
starts ``--processes`` consumer processes of that system (``bench.overhead_worker``), waits
until each is connected and ready, then gives the start signal and lets them drain the queue.

Timed: from the database's clock at the start signal to the last completion recorded in the
database (analysisq ``completed_at``, PGQueuer's ``pgqueuer_log`` 'successful' rows,
procrastinate's 'succeeded' events). Rounds rotate the order of the systems to damp the
noise of a shared machine; the table gives every round, the median items/s per system and
the ratios (analysisq >= 1.2x PGQueuer, issue 15, and >= 2x procrastinate); the verdict uses
the median of the per-round ratios, which pair runs seconds apart. It also reports the
CPU seconds the consumer processes and the PostgreSQL server (embedded server only) spent
per 1000 items, which is what a 2-core machine runs out of.

Comparable settings: every system gets the same number of processes and the same
per-process concurrency ``--batch`` (analysisq ``batchSize`` = items in flight and claim
size; PGQueuer ``batch_size`` of its batched dequeue; procrastinate ``concurrency``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg

from analysisq.queue import runs
from analysisq.spec import parse_spec

from .common import (
    ROOT,
    BenchDB,
    Reporter,
    bench_database,
    child_env,
    copy_prompts,
    stopwatch,
    table,
)
from .overhead_worker import NOOP_ENTRYPOINT, procrastinate_app

NAME = "overhead"
SYSTEMS = ("analysisq", "pgqueuer", "procrastinate")
READY_TIMEOUT_S = 120.0

#: ``--schema-whatif``: schema changes to measure before proposing them (scratch database).
SCHEMA_WHATIFS = {
    "no-results-fk": "ALTER TABLE analysis_results DROP CONSTRAINT analysis_results_queue_id_fkey",
    # the stuck-item query only looks at processing rows: index those alone, so that claims,
    # completions and heartbeats no longer insert entries for every status change
    "partial-status-idx": "DROP INDEX analysis_queue_status_idx;"
    " CREATE INDEX analysis_queue_processing_updated_idx ON analysis_queue (updated_at)"
    " WHERE status = 'processing'",
    "no-status-idx": "DROP INDEX analysis_queue_status_idx",
    # results keyed by their item: one index and no sequence per result row
    "results-by-queue-id": "ALTER TABLE analysis_results DROP CONSTRAINT analysis_results_pkey;"
    " ALTER TABLE analysis_results DROP COLUMN id;"
    " ALTER TABLE analysis_results DROP CONSTRAINT analysis_results_queue_id_key;"
    " ALTER TABLE analysis_results ADD PRIMARY KEY (queue_id)",
}


@dataclass
class RoundResult:
    system: str
    round: int
    items: int
    done: int
    seconds: float
    items_per_s: float
    worker_cpu_s: float
    db_cpu_s: float | None
    exit_wall_s: float


class PostgresCpu:
    """CPU seconds spent by a local PostgreSQL server (postmaster, backends, helpers)."""

    def __init__(self, db: BenchDB) -> None:
        self._proc: Any = None
        if db.data_dir is None:
            return
        with contextlib.suppress(Exception):
            import psutil

            pid = int((db.data_dir / "pgdata" / "postmaster.pid").read_text().split()[0])
            self._proc = psutil.Process(pid)

    def seconds(self) -> float | None:
        if self._proc is None:
            return None
        import psutil

        t = self._proc.cpu_times()
        # exited backends were reaped by the postmaster: they are in children_*
        total = float(t.user + t.system + t.children_user + t.children_system)
        for child in self._proc.children():
            with contextlib.suppress(psutil.Error):
                ct = child.cpu_times()
                total += ct.user + ct.system
        return total


async def install(db: BenchDB, conn: asyncpg.Connection, items: int) -> None:
    """analysisq is migrated already; install PGQueuer's and procrastinate's schemas."""
    from pgqueuer import AsyncpgDriver, Queries

    await Queries(AsyncpgDriver(conn)).install()
    app = procrastinate_app(db.url, 2)
    async with app.open_async():
        await app.schema_manager.apply_schema_async()
    await copy_prompts(conn, items)


async def reset(conn: asyncpg.Connection) -> None:
    """Empty every queue so that each round starts from the same state."""
    await conn.execute(
        "TRUNCATE analysis_results, analysis_queue, batch_submissions, run_targets, analysis_runs;"
        " TRUNCATE pgqueuer, pgqueuer_log, pgqueuer_statistics;"
        " TRUNCATE procrastinate_jobs, procrastinate_events, procrastinate_workers CASCADE"
    )


async def enqueue(
    db: BenchDB, conn: asyncpg.Connection, system: str, items: int, batch: int, processes: int
) -> None:
    """Put *items* no-op jobs in *system*'s queue (one batched statement each)."""
    if system == "analysisq":
        spec = parse_spec(
            {
                "targets": [{"name": "echo", "provider": "echo", "model": "echo-1"}],
                "batchSize": batch,
                "workers": processes,
            }
        )
        await runs.create_run(conn, "bench-overhead", spec)
        res = await runs.fill(conn, "bench-overhead", spec)
        assert res.inserted == items, res
    elif system == "pgqueuer":
        from pgqueuer import AsyncpgDriver, Queries

        await Queries(AsyncpgDriver(conn)).enqueue(
            [NOOP_ENTRYPOINT] * items, [None] * items, [0] * items
        )
    else:
        app = procrastinate_app(db.url, 2)
        async with app.open_async():
            from .overhead_worker import _PROCRASTINATE

            await _PROCRASTINATE["task"].batch_defer_async(*({} for _ in range(items)))
    await conn.execute("VACUUM ANALYZE")
    await conn.execute("CHECKPOINT")


async def finished(conn: asyncpg.Connection, system: str) -> tuple[int, datetime | None]:
    """How many jobs the database records as done, and when the last one was."""
    sql = {
        "analysisq": "SELECT count(*), max(completed_at) FROM analysis_queue"
        " WHERE status = 'completed'",
        "pgqueuer": "SELECT count(*), max(created) FROM pgqueuer_log WHERE status = 'successful'",
        "procrastinate": "SELECT count(*), max(at) FROM procrastinate_events"
        " WHERE type = 'succeeded'",
    }[system]
    row = await conn.fetchrow(sql)
    assert row is not None
    return int(row[0]), row[1]


def _base(system: str) -> tuple[str, str]:
    """``analysisq:noreset,eager`` -> (``analysisq``, ``noreset,eager``)."""
    base, _, whatif = system.partition(":")
    return base, whatif


def system_name(text: str) -> str:
    """Validate a ``--systems`` entry: a system, or ``analysisq:WHATIF[,WHATIF]``."""
    from .whatif import WHATIFS

    base, whatif = _base(text)
    if base not in SYSTEMS:
        raise argparse.ArgumentTypeError(f"unknown system {base!r}; known: {SYSTEMS}")
    bad = [w for w in whatif.split(",") if w and w not in WHATIFS]
    if whatif and (base != "analysisq" or bad):
        raise argparse.ArgumentTypeError(f"what-ifs apply to analysisq only: {WHATIFS}")
    return text


async def _spawn(
    system: str,
    url: str,
    batch: int,
    pool_size: int,
    log: Path,
    profile: Path | None,
    pooler: str = "none",
) -> asyncio.subprocess.Process:
    system, whatif = _base(system)
    extra = ["--profile-out", str(profile)] if profile else []
    extra += ["--whatif", whatif] if whatif else []
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.overhead_worker",
        system,
        "--url",
        url,
        "--batch",
        str(batch),
        "--pool-size",
        str(pool_size),
        *extra,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=log.open("ab"),
        env=child_env(ANALYSISQ_LOG_LEVEL="WARNING", ANALYSISQ_DATABASE_POOLER=pooler),
        cwd=str(ROOT),
    )


async def _ready(proc: asyncio.subprocess.Process, log: Path) -> None:
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), READY_TIMEOUT_S)
    if line.strip() != b"ready":
        raise RuntimeError(f"consumer did not start: {line!r}; see {log}")


async def run_round(
    db: BenchDB,
    conn: asyncpg.Connection,
    system: str,
    rnd: int,
    args: argparse.Namespace,
    pg_cpu: PostgresCpu,
    logdir: Path,
) -> RoundResult:
    base, _ = _base(system)
    await reset(conn)
    await enqueue(db, conn, base, args.items, args.batch, args.processes)
    log = logdir / f"{system.replace(':', '+').replace(',', '+')}-{rnd}.log"
    procs = [
        await _spawn(
            system,
            db.url,
            args.batch,
            args.pool_size,
            log,
            log.with_suffix(f".{i}.pyinstrument.txt") if args.pyinstrument else None,
            args.pooler,
        )
        for i in range(args.processes)
    ]
    if args.pg_stats:
        await conn.execute("SELECT pg_stat_statements_reset()")
    try:
        await asyncio.gather(*(_ready(p, log) for p in procs))
        db_cpu0 = pg_cpu.seconds()
        t0: datetime = await conn.fetchval("SELECT clock_timestamp()")
        with stopwatch() as wall:
            for p in procs:
                assert p.stdin is not None
                p.stdin.write(b"go\n")
                await p.stdin.drain()
            outs = await asyncio.wait_for(
                asyncio.gather(*(p.communicate() for p in procs)), args.timeout
            )
        db_cpu1 = pg_cpu.seconds()
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()
    reports = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    if args.pg_stats:
        await _print_statements(conn, system)
    done, last = await finished(conn, base)
    if done != args.items or last is None:
        raise RuntimeError(f"{system}: {done} of {args.items} jobs done; see {log}")
    seconds = (last - t0).total_seconds()
    return RoundResult(
        system=system,
        round=rnd,
        items=args.items,
        done=done,
        seconds=round(seconds, 3),
        items_per_s=round(args.items / seconds, 1),
        worker_cpu_s=round(sum(r["cpu_s"] for r in reports), 3),
        db_cpu_s=None if db_cpu0 is None or db_cpu1 is None else round(db_cpu1 - db_cpu0, 3),
        exit_wall_s=round(wall[0], 3),
    )


async def _print_statements(conn: asyncpg.Connection, system: str) -> None:
    """The statements that took the server's time during the round (pg_stat_statements)."""
    rows = await conn.fetch(
        "SELECT calls, plans, round(total_plan_time::numeric, 1) AS plan_ms,"
        " round(total_exec_time::numeric, 1) AS total_ms,"
        " round(mean_exec_time::numeric, 3) AS mean_ms, rows,"
        " regexp_replace(left(query, 90), '\\s+', ' ', 'g') AS query"
        " FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database"
        " WHERE datname = current_database()) AND query NOT ILIKE '%pg_stat_statements%'"
        " ORDER BY total_exec_time DESC LIMIT 8"
    )
    print(f"    {system}: top statements by server time")
    print(
        table(
            ["calls", "plans", "planning ms", "exec ms", "mean exec ms", "rows", "query"],
            [
                [
                    r["calls"],
                    r["plans"],
                    float(r["plan_ms"]),
                    float(r["total_ms"]),
                    float(r["mean_ms"]),
                    r["rows"],
                    r["query"],
                ]
                for r in rows
            ],
        )
    )


def _per_1000(cpu: float | None, items: int) -> float | None:
    return None if cpu is None else round(cpu / items * 1000, 3)


async def main(args: argparse.Namespace, reporter: Reporter) -> None:
    if args.quick:
        args.items, args.rounds = min(args.items, 1000), 1
    systems = list(dict.fromkeys(args.systems))
    preload = ["pg_stat_statements"] if args.pg_stats else []
    async with bench_database(NAME, preload=preload) as db:
        reporter.header(
            f"overhead: no-op job, {args.processes} processes x concurrency {args.batch},"
            f" {args.items:,} jobs per round, {args.rounds} round(s)",
            db,
        )
        conn = await asyncpg.connect(db.url)
        pg_cpu = PostgresCpu(db)
        logdir = Path(tempfile.mkdtemp(prefix="analysisq-bench-overhead-"))
        try:
            await install(db, conn, args.items)
            if args.pg_stats:
                await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
                # plans next to calls: a statement planned on every execution shows it here
                await conn.execute("ALTER SYSTEM SET pg_stat_statements.track_planning = on")
                await conn.execute("SELECT pg_reload_conf()")
            for name in args.schema_whatif or []:
                # what-if on this scratch database only: the schema in sql/ is unchanged
                await conn.execute(SCHEMA_WHATIFS[name])
                print(f"schema what-if applied to this scratch database: {name}")
            results: list[RoundResult] = []
            for rnd in range(args.rounds):
                order = systems[rnd % len(systems) :] + systems[: rnd % len(systems)]
                for system in order:
                    r = await run_round(db, conn, system, rnd + 1, args, pg_cpu, logdir)
                    results.append(r)
                    print(
                        f"  round {r.round} {system:<13} {r.items_per_s:8.0f} items/s"
                        f"  ({r.seconds:.2f} s; worker CPU {r.worker_cpu_s:.2f} s;"
                        f" DB CPU {r.db_cpu_s} s)",
                        flush=True,
                    )
                    reporter.record(
                        NAME, f"{system} round {r.round}", asdict(r), params=_params(args), db=db
                    )
        finally:
            await conn.close()
        _summary(results, systems, args, reporter, db)
        print(f"consumer logs: {logdir}")


def _params(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "items": args.items,
        "processes": args.processes,
        "batch": args.batch,
        "rounds": args.rounds,
        "procrastinate_pool_size": args.pool_size,
        "schema_whatif": args.schema_whatif or [],
        "pooler": args.pooler,
    }


def _summary(
    results: list[RoundResult],
    systems: list[str],
    args: argparse.Namespace,
    reporter: Reporter,
    db: BenchDB,
) -> None:
    print()
    rows = []
    med: dict[str, float] = {}
    #: CPU seconds (consumers + server) per 1000 items: the load-independent cost
    cpu: dict[str, float | None] = {}
    for s in systems:
        of_s = [r for r in results if r.system == s]
        med[s] = statistics.median(r.items_per_s for r in of_s)
        cpu_w = statistics.median(_per_1000(r.worker_cpu_s, r.items) or 0 for r in of_s)
        db_cpus = [_per_1000(r.db_cpu_s, r.items) for r in of_s]
        cpu_db = (
            statistics.median(c for c in db_cpus if c is not None)
            if all(c is not None for c in db_cpus)
            else None
        )
        cpu[s] = None if cpu_db is None else round(cpu_w + cpu_db, 3)
        rows.append(
            [s, *(r.items_per_s for r in of_s), med[s], cpu_w, "-" if cpu_db is None else cpu_db]
        )
    print(
        table(
            [
                "system",
                *(f"round {i + 1} items/s" for i in range(args.rounds)),
                "median items/s",
                "worker CPU s/1000",
                "DB CPU s/1000",
            ],
            rows,
        )
    )
    ratios: dict[str, Any] = {}
    lines = []
    for mine in (s for s in systems if _base(s)[0] == "analysisq"):
        for other, target in (("pgqueuer", 1.2), ("procrastinate", 2.0)):
            if other not in med:
                continue
            per_round = [
                a.items_per_s / o.items_per_s
                for a in results
                if a.system == mine
                for o in results
                if o.system == other and o.round == a.round
            ]
            ratio = med[mine] / med[other]
            # the verdict pairs systems measured in the same round (seconds apart), which a
            # shared machine's swings in load disturb less than medians taken separately
            round_median = statistics.median(per_round)
            mine_cpu, other_cpu = cpu.get(mine), cpu.get(other)
            cpu_ratio = round(other_cpu / mine_cpu, 2) if mine_cpu and other_cpu else None
            verdict = "met" if round_median >= target else "MISSED"
            if mine != "analysisq":
                verdict = f"what-if ({verdict.lower()})"
            ratios[f"{mine} / {other}"] = {
                "ratio_of_medians": round(ratio, 2),
                "median_of_round_ratios": round(round_median, 2),
                "per_round": [round(x, 2) for x in per_round],
                "cpu_per_item_ratio": cpu_ratio,
                "target": target,
                "verdict": verdict,
            }
            lines.append(
                [
                    f"{mine} / {other}",
                    round(round_median, 2),
                    round(ratio, 2),
                    ", ".join(f"{x:.2f}" for x in per_round),
                    "-" if cpu_ratio is None else cpu_ratio,
                    f">= {target:g}x",
                    verdict,
                ]
            )
    if not lines:
        return
    print()
    print(
        table(
            [
                "items/s ratio",
                "median of round ratios",
                "of medians",
                "per round",
                "CPU/item: other / mine",
                "target",
                "verdict",
            ],
            lines,
        )
    )
    reporter.record(
        NAME, "summary", {"median_items_per_s": med, "ratios": ratios}, params=_params(args), db=db
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--items", type=int, default=10_000, help="jobs per round (default 10000)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--processes", type=int, default=2, help="consumer processes per system")
    p.add_argument(
        "--batch",
        type=int,
        default=10,
        help="per-process concurrency / batch size of every system (default 10)",
    )
    p.add_argument(
        "--pool-size",
        type=int,
        default=4,
        help="procrastinate's psycopg pool size per process (default 4)",
    )
    p.add_argument(
        "--systems",
        nargs="+",
        default=list(SYSTEMS),
        type=system_name,
        metavar="SYSTEM",
        help="analysisq, pgqueuer, procrastinate, or analysisq:WHATIF[,WHATIF] with "
        "WHATIF from bench.whatif (noreset, norate, eager, separate): a variant, measured "
        "beside the production worker",
    )
    p.add_argument(
        "--pooler",
        choices=["none", "transaction"],
        default="none",
        help="transaction: connect analysisq and PGQueuer as behind a pooler in transaction "
        "mode (ANALYSISQ_DATABASE_POOLER=transaction: no statement cache, every statement "
        "parsed on each execution), directly to the same server",
    )
    p.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per round")
    p.add_argument(
        "--pg-stats",
        action="store_true",
        help="embedded server: print each round's top statements (pg_stat_statements)",
    )
    p.add_argument(
        "--schema-whatif",
        action="append",
        choices=sorted(SCHEMA_WHATIFS),
        help="what-if: change the scratch database's schema before the rounds (repeatable; "
        "every analysisq entry of the run is affected)",
    )
    p.add_argument(
        "--pyinstrument",
        action="store_true",
        help="profile every consumer process with pyinstrument (files in the log dir)",
    )

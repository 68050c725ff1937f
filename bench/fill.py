"""``fill``: time of the one idempotent fill statement for 10k and 1M items.

For each case the queue and prompt tables are emptied, the prompts loaded with COPY and
analysed, the run recorded, and then only the ``fill_run`` statement is timed (DESIGN:
10k items < 1 s, 1M items < 60 s; issue 15: 1M < 10 s). The same statement is then run
again on the filled run: the idempotent re-fill after a crash, which inserts nothing.
``--before`` times the fill statement of before migration 0013 (``INSERT ... ON CONFLICT``,
checked by the reference trigger) right after each case, ``--before-0011`` that statement on
the schema of before 0011.

``--explain`` runs ``EXPLAIN (ANALYZE, BUFFERS)`` of the statement of before 0013 for the
largest case on a fresh run, which shows the time of the triggers that check the queue's
references; ``--profile`` re-times
the largest case on this scratch database: the fill of ``sql/``, the statement of before
0013, and that statement with one cost removed at a time (the reference check, the
submission foreign key, each secondary index, the ORDER BY, ON CONFLICT) or with the schema
of before migration 0011 restored (per-row foreign keys, the full status
index), which is the before/after comparison in one run; ``--reads`` shows what the narrower
status index costs the whole-table reads (``fill_reads``). The schema in ``sql/`` is never
changed: only the throwaway benchmark database is.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import asyncpg

from analysisq.db.sql import query
from analysisq.queue import runs
from analysisq.spec import AnalysisRunSpec, parse_spec

from . import fill_reads
from .common import Reporter, bench_database, copy_prompts, server_cpu_s, stopwatch, table

NAME = "fill"
# DESIGN: 10k < 1 s, 1M < 60 s; issue 15 asked for 1M under 10 s on the 2-core machine
TARGETS_MS = {10_000: 1_000.0, 1_000_000: 10_000.0}


@dataclass(frozen=True)
class Case:
    prompts: int
    targets: int

    @property
    def items(self) -> int:
        return self.prompts * self.targets

    @property
    def label(self) -> str:
        return f"{self.prompts:,} prompts x {self.targets} target(s)"


def parse_case(text: str) -> Case:
    """``PROMPTSxTARGETS``, e.g. ``250000x4``."""
    p, _, t = text.lower().partition("x")
    return Case(int(p.replace("_", "")), int(t or 1))


DEFAULT_CASES = [Case(10_000, 1), Case(250_000, 4), Case(1_000_000, 1)]
QUICK_CASES = [Case(10_000, 1), Case(25_000, 4)]


def run_spec(targets: int) -> AnalysisRunSpec:
    return parse_spec(
        {
            "targets": [
                {"name": f"t{i + 1}", "provider": "echo", "model": "echo-1"} for i in range(targets)
            ]
        }
    )


def fill_args(run_id: str, spec: AnalysisRunSpec) -> tuple[object, ...]:
    """The parameters of ``fill_run`` for *spec*, in the order of its text."""
    sel = spec.prompts
    targets = [t.name for t in spec.targets]
    return query("fill_run").args(run_id=run_id, targets=targets, tags=sel.tags, ids=sel.ids)


async def prepare(conn: asyncpg.Connection, case: Case) -> None:
    """Empty the tables and load the case's prompts."""
    await conn.execute(
        "TRUNCATE analysis_results, analysis_queue, batch_submissions, run_targets, analysis_runs"
    )
    await conn.execute("TRUNCATE prompts RESTART IDENTITY CASCADE")
    await copy_prompts(conn, case.prompts)
    # the prompts as a day's upsert leaves them once autovacuum has passed: hint bits set and
    # pages all-visible, so the timed fill does not pay for the load's first read
    await conn.execute("VACUUM ANALYZE analysis_queue, prompts")
    await conn.execute("CHECKPOINT")


#: The fill statement of before migration 0013 (the INSERT ... ON CONFLICT of 0011, checked
#: by the statement-level reference trigger like any client's INSERT), same parameters.
BEFORE_0013_FILL = """INSERT INTO analysis_queue (run_id, prompt_tracking_id, target)
SELECT $1, p.id, t.target
FROM prompts p
CROSS JOIN unnest($2::text[]) AS t(target)
WHERE (CASE WHEN cardinality($4::text[]) > 0 THEN p.external_id = ANY ($4::text[])
            ELSE p.active END)
  AND (cardinality($3::text[]) = 0 OR p.tags && $3::text[])
ORDER BY p.id, t.target
ON CONFLICT (run_id, prompt_tracking_id, target) DO NOTHING"""


async def run_fill(conn: asyncpg.Connection, text: str, args: tuple[object, ...]) -> int:
    """Run a fill statement (``fill_run``'s function call, or an INSERT): the rows added."""
    if text.lstrip().startswith("INSERT"):
        return int((await conn.execute(text, *args)).split()[-1])
    return int(await conn.fetchval(text, *args))


async def timed_fill(
    conn: asyncpg.Connection, run_id: str, spec: AnalysisRunSpec, pid: int | None, text: str
) -> tuple[float, float, int]:
    """Seconds of the fill statement alone, its backend's CPU seconds, the rows it inserted."""
    cpu = server_cpu_s(pid)
    with stopwatch() as t:
        inserted = await run_fill(conn, text, fill_args(run_id, spec))
    return t[0], server_cpu_s(pid) - cpu, inserted


async def measure(
    conn: asyncpg.Connection, case: Case, pid: int | None, change: str = "", text: str = ""
) -> dict[str, float | int]:
    """The fill and the re-fill of *case* by *text* (``fill_run`` when empty); with *change*
    (the schema of before 0011) applied in a transaction rolled back afterwards."""
    text = text or query("fill_run").text
    await prepare(conn, case)
    spec = run_spec(case.targets)
    await runs.create_run(conn, "bench-fill", spec)
    tr = conn.transaction()
    if change:
        await tr.start()
        await conn.execute(change)
    try:
        first_s, first_cpu, inserted = await timed_fill(conn, "bench-fill", spec, pid, text)
        again_s, again_cpu, again = await timed_fill(conn, "bench-fill", spec, pid, text)
    finally:
        if change:
            await tr.rollback()
    return {
        "items": case.items,
        "inserted": inserted,
        "fill_s": round(first_s, 3),
        "fill_cpu_s": round(first_cpu, 2),
        "items_per_s": round(inserted / first_s),
        "refill_s": round(again_s, 3),
        "refill_cpu_s": round(again_cpu, 2),
        "refill_inserted": again,
    }


async def explain(conn: asyncpg.Connection, case: Case) -> str:
    """EXPLAIN ANALYZE of the fill statement of before 0013 for *case* on a fresh run (it does
    insert): the plan of the INSERT and the time of the triggers; the function of 0013 runs
    the same SELECT with an anti-join against the run's (absent) rows instead of ON
    CONFLICT."""
    await prepare(conn, case)
    spec = run_spec(case.targets)
    await runs.create_run(conn, "bench-explain", spec)
    rows = await conn.fetch(
        "EXPLAIN (ANALYZE, BUFFERS, VERBOSE OFF) " + BEFORE_0013_FILL,
        *fill_args("bench-explain", spec),
    )
    return "\n".join(r[0] for r in rows)


#: The schema of before migration 0011, restored on the scratch database for a variant.
BEFORE_0011_FKS = (
    "DROP TRIGGER analysis_queue_refs_inserted ON analysis_queue;"
    " ALTER TABLE analysis_queue"
    " ADD FOREIGN KEY (prompt_tracking_id) REFERENCES prompts (id),"
    " ADD FOREIGN KEY (run_id, target) REFERENCES run_targets (run_id, target) ON DELETE CASCADE"
)
BEFORE_0011_INDEX = (
    "DROP INDEX analysis_queue_status_idx;"
    " CREATE INDEX analysis_queue_status_idx ON analysis_queue (status, updated_at)"
)
BEFORE_0011 = f"{BEFORE_0011_FKS}; {BEFORE_0011_INDEX}"
#: (label, SQL applied first, the fill's text: as in sql/, the INSERT of before 0013, it
#: without ORDER BY or ON CONFLICT); the variants after the first four change that INSERT
VARIANTS = [
    ("as in sql/ (baseline)", "", "fill_run"),
    ("the INSERT ... ON CONFLICT of before 0013", "", "insert"),
    (
        "0013 without FK analysis_queue_submission_id_fkey",
        "ALTER TABLE analysis_queue DROP CONSTRAINT analysis_queue_submission_id_fkey",
        "fill_run",
    ),
    ("0013 without analysis_queue_claim_idx", "DROP INDEX analysis_queue_claim_idx", "fill_run"),
    (
        "as before 0011 (per-row FKs, full status index)",
        f"{BEFORE_0011_FKS}; {BEFORE_0011_INDEX}",
        "insert",
    ),
    ("with the per-row FKs of before 0011", BEFORE_0011_FKS, "insert"),
    ("with the full status index of before 0011", BEFORE_0011_INDEX, "insert"),
    (
        "without the reference check (no guarantee)",
        "DROP TRIGGER analysis_queue_refs_inserted ON analysis_queue",
        "insert",
    ),
    (
        "without FK analysis_queue_submission_id_fkey",
        "ALTER TABLE analysis_queue DROP CONSTRAINT analysis_queue_submission_id_fkey",
        "insert",
    ),
    ("without analysis_queue_status_idx", "DROP INDEX analysis_queue_status_idx", "insert"),
    ("without analysis_queue_claim_idx", "DROP INDEX analysis_queue_claim_idx", "insert"),
    ("without ORDER BY", "", "no_order"),
    ("without ON CONFLICT", "", "no_conflict"),
]


async def profile(
    conn: asyncpg.Connection, case: Case, pid: int | None
) -> list[tuple[str, float, float]]:
    """Time the fill with one cost removed (or the schema of before 0011 restored) at a time,
    on this scratch database only: each variant's change is made inside a transaction that is
    rolled back after the timing."""
    text = BEFORE_0013_FILL
    sql_by_kind = {
        "fill_run": query("fill_run").text,
        "insert": text,
        "no_order": text.replace("ORDER BY p.id, t.target\n", ""),
        "no_conflict": text.replace(
            "ON CONFLICT (run_id, prompt_tracking_id, target) DO NOTHING", ""
        ),
    }
    out: list[tuple[str, float, float]] = []
    spec = run_spec(case.targets)
    for label, change, kind in VARIANTS:
        await prepare(conn, case)
        await runs.create_run(conn, "bench-profile", spec)
        tr = conn.transaction()
        await tr.start()
        try:
            if change:
                await conn.execute(change)
            cpu = server_cpu_s(pid)
            with stopwatch() as t:
                await run_fill(conn, sql_by_kind[kind], fill_args("bench-profile", spec))
            cpu = server_cpu_s(pid) - cpu
        finally:
            await tr.rollback()
        out.append((label, t[0], cpu))
        print(f"  {label}: {t[0]:.2f} s, backend CPU {cpu:.2f} s", flush=True)
    return out


async def main(args: argparse.Namespace, reporter: Reporter) -> None:
    cases = (
        [parse_case(c) for c in args.case]
        if args.case
        else (QUICK_CASES if args.quick else DEFAULT_CASES)
    )
    async with bench_database(NAME) as db:
        reporter.header("fill: the fill_run statement (analysisq_fill_run, migration 0013)", db)
        conn = await asyncpg.connect(db.url)
        try:
            pid = await conn.fetchval("SELECT pg_backend_pid()") if db.embedded else None
            schemas = [("sql/", "", "")]
            if args.before:
                schemas += [("before 0013", "", BEFORE_0013_FILL)]
            if args.before_0011:
                schemas += [("before 0011", BEFORE_0011, BEFORE_0013_FILL)]
            rows = []
            for case in cases:
                target = TARGETS_MS.get(case.items)
                for schema, change, text in schemas:
                    m = await measure(conn, case, pid, change, text)
                    verdict = (
                        "-"
                        if target is None
                        else ("met" if m["fill_s"] * 1000 < target else "MISSED")
                    )
                    rows.append(
                        [
                            case.label,
                            schema,
                            m["fill_s"],
                            m["fill_cpu_s"],
                            m["items_per_s"],
                            m["refill_s"],
                            m["refill_cpu_s"],
                            f"< {target / 1000:g} s" if target else "-",
                            verdict,
                        ]
                    )
                    reporter.record(
                        NAME,
                        case.label if not text else f"{case.label}, {schema}",
                        dict(m),
                        params=vars(case)
                        | {"target_s": target / 1000 if target else None, "schema": schema},
                        db=db,
                    )
                    print(f"  {case.label}, {schema}: {m['fill_s']:.3f} s", flush=True)
            print()
            headers = ["case", "schema", "fill s", "fill CPU s", "items/s", "re-fill s"]
            print(table([*headers, "re-fill CPU s", "target", "verdict"], rows))
            big = max(cases, key=lambda c: c.items)
            if args.explain:
                print(f"\nEXPLAIN ANALYZE of the fill, {big.label}:")
                print(await explain(conn, big))
            if args.reads:
                await prepare(conn, big)
                spec = run_spec(big.targets)
                await runs.create_run(conn, "bench-reads", spec)
                await run_fill(conn, query("fill_run").text, fill_args("bench-reads", spec))
                states = await fill_reads.spread_states(conn, "bench-reads")
                print(f"\nWhole-table reads of the queue, {big.label} ({states}):")
                reads = await fill_reads.compare(conn)
                print(
                    table(
                        ["read", "scans (as in sql/)", "ms", "scans (full index)", "ms"],
                        reads,
                    )
                )
                reporter.record(
                    NAME,
                    f"reads {big.label}",
                    {str(r[0]): [r[2], r[4]] for r in reads},
                    params=vars(big),
                    db=db,
                )
            if args.profile:
                print(f"\nWhat the fill of {big.label} costs (one thing removed at a time):")
                prof = await profile(conn, big, pid)
                base, base_cpu = prof[0][1], prof[0][2] or 1.0
                print(
                    table(
                        ["variant", "fill s", "vs baseline", "CPU s", "CPU vs baseline"],
                        [[k, v, f"{v / base:.2f}x", c, f"{c / base_cpu:.2f}x"] for k, v, c in prof],
                    )
                )
                reporter.record(
                    NAME,
                    f"profile {big.label}",
                    {k: [round(v, 3), round(c, 2)] for k, v, c in prof},
                    params=vars(big),
                    db=db,
                )
        finally:
            await conn.close()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--case",
        action="append",
        metavar="PROMPTSxTARGETS",
        help="a case such as 10000x1 or 250000x4 (repeatable); default: "
        "10000x1, 250000x4, 1000000x1",
    )
    p.add_argument(
        "--before",
        action="store_true",
        help="time each case also with the fill statement of before migration 0013 (INSERT ... "
        "ON CONFLICT, its rows checked by the reference trigger), right after the current one",
    )
    p.add_argument(
        "--before-0011",
        action="store_true",
        help="time each case also with that statement on the schema of before migration 0011 "
        "(per-row foreign keys, the full status index)",
    )
    p.add_argument("--explain", action="store_true", help="EXPLAIN ANALYZE the largest case")
    p.add_argument(
        "--reads",
        action="store_true",
        help="the whole-table reads of the queue (runbook) on the largest case, with the "
        "status index of sql/ and with the full one it replaced",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="re-time the largest case with one cost removed at a time",
    )

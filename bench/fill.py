"""``fill``: time of the one idempotent fill statement for 10k and 1M items.

For each case the queue and prompt tables are emptied, the prompts loaded with COPY and
analysed, the run recorded, and then only the ``fill_run`` statement is timed (DESIGN:
10k items < 1 s, 1M items < 60 s). The same statement is then run again on the filled run:
the idempotent re-fill after a crash, which inserts nothing.

``--explain`` runs ``EXPLAIN (ANALYZE, BUFFERS)`` of the largest case on a fresh run, which
shows the per-row trigger costs of the foreign keys; ``--profile`` re-times the largest case
on this scratch database with one cost removed at a time (each foreign key, the secondary
indexes, the ORDER BY, ON CONFLICT) to show what dominates. The schema in ``sql/`` is never
changed: only the throwaway benchmark database is.
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import asyncpg

from analysisq.db.sql import query
from analysisq.queue import runs
from analysisq.spec import AnalysisRunSpec, parse_spec

from .common import Reporter, bench_database, copy_prompts, stopwatch, table

NAME = "fill"
TARGETS_MS = {10_000: 1_000.0, 1_000_000: 60_000.0}


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
    await conn.execute("VACUUM ANALYZE analysis_queue")
    await conn.execute("CHECKPOINT")


async def timed_fill(
    conn: asyncpg.Connection, run_id: str, spec: AnalysisRunSpec
) -> tuple[float, int]:
    """Seconds of the fill statement alone, and the rows it inserted."""
    with stopwatch() as t:
        status = await conn.execute(query("fill_run").text, *fill_args(run_id, spec))
    return t[0], int(status.split()[-1])


async def measure(conn: asyncpg.Connection, case: Case) -> dict[str, float | int]:
    await prepare(conn, case)
    spec = run_spec(case.targets)
    await runs.create_run(conn, "bench-fill", spec)
    first_s, inserted = await timed_fill(conn, "bench-fill", spec)
    again_s, again = await timed_fill(conn, "bench-fill", spec)
    return {
        "items": case.items,
        "inserted": inserted,
        "fill_s": round(first_s, 3),
        "items_per_s": round(inserted / first_s),
        "refill_s": round(again_s, 3),
        "refill_inserted": again,
    }


async def explain(conn: asyncpg.Connection, case: Case) -> str:
    """EXPLAIN ANALYZE of the fill for *case* on a fresh run (it does insert)."""
    await prepare(conn, case)
    spec = run_spec(case.targets)
    await runs.create_run(conn, "bench-explain", spec)
    rows = await conn.fetch(
        "EXPLAIN (ANALYZE, BUFFERS, VERBOSE OFF) " + query("fill_run").text,
        *fill_args("bench-explain", spec),
    )
    return "\n".join(r[0] for r in rows)


Variant = Callable[[asyncpg.Connection], Awaitable[None]]


async def _noop(conn: asyncpg.Connection) -> None:
    return None


def _drop(sql: str) -> Variant:
    async def apply(conn: asyncpg.Connection) -> None:
        await conn.execute(sql)

    return apply


async def profile(conn: asyncpg.Connection, case: Case) -> list[tuple[str, float]]:
    """Time the fill with one cost removed at a time (on this scratch database only).

    Each variant gets a fresh copy of the schema state: the constraint or index is dropped
    inside a transaction that is rolled back after the timing.
    """
    fks = await conn.fetch(
        "SELECT conname FROM pg_constraint WHERE conrelid = 'analysis_queue'::regclass"
        " AND contype = 'f' ORDER BY conname"
    )
    variants: list[tuple[str, Variant, str]] = [("as in sql/ (baseline)", _noop, "fill_run")]
    for fk in fks:
        name = fk["conname"]
        variants.append(
            (
                f"without FK {name}",
                _drop(f"ALTER TABLE analysis_queue DROP CONSTRAINT {name}"),
                "fill_run",
            )
        )
    variants.append(
        (
            "without both FKs",
            _drop(
                "; ".join(
                    f"ALTER TABLE analysis_queue DROP CONSTRAINT {fk['conname']}" for fk in fks
                )
            ),
            "fill_run",
        )
    )
    variants.append(
        (
            "without analysis_queue_status_idx",
            _drop("DROP INDEX analysis_queue_status_idx"),
            "fill_run",
        )
    )
    variants.append(
        (
            "without analysis_queue_claim_idx",
            _drop("DROP INDEX analysis_queue_claim_idx"),
            "fill_run",
        )
    )
    variants.append(("without ORDER BY", _noop, "no_order"))
    out: list[tuple[str, float]] = []
    spec = run_spec(case.targets)
    sql_by_kind = {
        "fill_run": query("fill_run").text,
        "no_order": query("fill_run").text.replace("ORDER BY p.id, t.target\n", ""),
    }
    for label, apply, kind in variants:
        await prepare(conn, case)
        await runs.create_run(conn, "bench-profile", spec)
        tr = conn.transaction()
        await tr.start()
        try:
            await apply(conn)
            with stopwatch() as t:
                await conn.execute(sql_by_kind[kind], *fill_args("bench-profile", spec))
        finally:
            await tr.rollback()
        out.append((label, t[0]))
        print(f"  {label}: {t[0]:.2f} s", flush=True)
    return out


async def main(args: argparse.Namespace, reporter: Reporter) -> None:
    cases = (
        [parse_case(c) for c in args.case]
        if args.case
        else (QUICK_CASES if args.quick else DEFAULT_CASES)
    )
    async with bench_database(NAME) as db:
        reporter.header("fill: one INSERT ... SELECT ... ON CONFLICT DO NOTHING", db)
        conn = await asyncpg.connect(db.url)
        try:
            rows = []
            for case in cases:
                m = await measure(conn, case)
                target = TARGETS_MS.get(case.items)
                verdict = (
                    "-" if target is None else ("met" if m["fill_s"] * 1000 < target else "MISSED")
                )
                rows.append(
                    [
                        case.label,
                        case.items,
                        m["fill_s"],
                        m["items_per_s"],
                        m["refill_s"],
                        f"< {target / 1000:g} s" if target else "-",
                        verdict,
                    ]
                )
                reporter.record(
                    NAME,
                    case.label,
                    dict(m),
                    params=vars(case) | {"target_s": target / 1000 if target else None},
                    db=db,
                )
                print(f"  {case.label}: {m['fill_s']:.3f} s", flush=True)
            print()
            print(
                table(
                    ["case", "items", "fill s", "items/s", "re-fill s", "target", "verdict"], rows
                )
            )
            big = max(cases, key=lambda c: c.items)
            if args.explain:
                print(f"\nEXPLAIN ANALYZE of the fill, {big.label}:")
                print(await explain(conn, big))
            if args.profile:
                print(f"\nWhat the fill of {big.label} costs (one thing removed at a time):")
                prof = await profile(conn, big)
                base = prof[0][1]
                print(
                    table(
                        ["variant", "fill s", "vs baseline"],
                        [[k, v, f"{v / base:.2f}x"] for k, v in prof],
                    )
                )
                reporter.record(
                    NAME,
                    f"profile {big.label}",
                    {k: round(v, 3) for k, v in prof},
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
    p.add_argument("--explain", action="store_true", help="EXPLAIN ANALYZE the largest case")
    p.add_argument(
        "--profile",
        action="store_true",
        help="re-time the largest case with one cost removed at a time",
    )

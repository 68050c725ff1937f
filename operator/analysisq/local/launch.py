"""From a command line to a supervised run: what ``analysisq run`` and ``analysisq demo``
share once the database is up.

``launch`` imports the prompt file (if any), creates and fills a new run (``start_run``) — or
reopens an unfinished one for ``--resume`` (``reopen_run``) — after checking that its
targets can work from here (``check_targets``), then hands the run to ``runner.Supervisor``
and returns how it ended.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from rich.console import Console

from analysisq.db.connect import acquire
from analysisq.errors import InputError
from analysisq.local.outcome import RunOutcome
from analysisq.local.prompt_import import import_prompts
from analysisq.local.runner import Supervisor
from analysisq.local.runspec import new_run_id, with_fixed_targets
from analysisq.providers import make_provider, resolve_api_key
from analysisq.queue import runs
from analysisq.queue.runs import Run
from analysisq.settings import Settings
from analysisq.spec import AnalysisRunSpec, parse_spec


async def start_run(
    conn: asyncpg.Connection, run_id: str, spec: AnalysisRunSpec, *, name: str
) -> tuple[Run, runs.FillResult]:
    """Record and fill a new run; refuse a run that selects no prompt."""
    await runs.create_run(conn, run_id, spec, name=name)
    filled = await runs.fill(conn, run_id, spec)
    if filled.inserted == 0:
        await runs.delete_run(conn, run_id)
        raise InputError(
            "the run selects no prompt: import prompts with --prompts FILE (or "
            "`analysisq prompts import FILE`), or check the prompts selector (--tag, spec ids)"
        )
    return await runs.get_run(conn, run_id), filled


async def reopen_run(
    conn: asyncpg.Connection, run_id: str, fixed_targets: list[str] | None = None
) -> tuple[Run, list[str]]:
    """An existing run, filled if it never was, its targets corrected by *fixed_targets*
    (``--target`` values), with its paused targets resumed."""
    run = await runs.get_run(conn, run_id)
    if fixed_targets:
        await runs.create_run(
            conn, run.id, with_fixed_targets(run.spec, fixed_targets), name=run.name
        )
        run = await runs.get_run(conn, run.id)
    if run.filled_at is None:
        await runs.fill(conn, run.id, run.spec)
    return run, await runs.resume_targets(conn, run.id)


async def check_targets(spec: AnalysisRunSpec) -> None:
    """Refuse targets that cannot work from here (an API key missing from the environment)
    before any run or worker exists; the workers would fail the same way."""
    async with httpx.AsyncClient() as client:
        for target in spec.targets:
            make_provider(target, client, resolve_api_key(target))


@dataclass(frozen=True)
class Launch:
    """What to run: a new run (*spec*, *name*) or an unfinished one (*resume*)."""

    spec: AnalysisRunSpec | None = None
    name: str = "local"
    resume: str | None = None
    #: ``--target`` values that correct targets of the resumed run (a misspelt model).
    fixed_targets: tuple[str, ...] = ()
    prompts_file: Path | None = None
    prompts_format: str | None = None
    #: Worker processes; default the spec's ``workers``.
    workers: int | None = None
    output: Path | None = None
    output_format: str | None = None
    #: ``--budget`` with ``--resume``: the stored run's new budget (it lifts a
    #: BudgetExhausted pause).
    budget: dict[str, Any] | None = None


async def launch(
    settings: Settings, url: str, pool: asyncpg.Pool, out: Console, what: Launch
) -> RunOutcome:
    """Import, create (or reopen) the run, and supervise it to its end."""
    if what.spec is not None:
        await check_targets(what.spec)
    async with acquire(pool) as conn:
        if what.prompts_file is not None:
            report = await import_prompts(
                conn,
                what.prompts_file,
                max_chars=settings.max_prompt_chars,
                batch_size=settings.import_batch_size,
                fmt=what.prompts_format,
            )
            for line in report.lines():
                out.print(line, soft_wrap=True)
        run = await _open(conn, out, what)
    supervisor = Supervisor(
        pool,
        run,
        settings,
        url,
        workers=what.workers or run.spec.workers,
        console=out,
        output=what.output,
        output_format=what.output_format,
    )
    return await supervisor.run_to_end()


async def _open(conn: asyncpg.Connection, out: Console, what: Launch) -> Run:
    if what.resume is not None:
        run, resumed = await reopen_run(conn, what.resume, list(what.fixed_targets))
        if what.budget is not None:
            spec = parse_spec({**run.spec.to_json(), "budget": what.budget}, source="--budget")
            await runs.create_run(conn, run.id, spec, name=run.name)
            run = await runs.get_run(conn, run.id)
            shown = ", ".join(f"{k}={v:g}" for k, v in what.budget.items())
            out.print(f"Budget of run {run.id} set to {shown}.")
        await check_targets(run.spec)
        if resumed:
            out.print(f"Un-paused targets {', '.join(resumed)}: they are tried again.")
        counts = await runs.counts(conn, run.id)
        out.print(
            f"Resuming run {run.id}: {counts.terminal:,} of {counts.total:,} items already "
            "done; nothing is redone."
        )
        return run
    if what.spec is None:
        raise ValueError("launch needs a spec or a run to resume")
    run, filled = await start_run(conn, new_run_id(what.name), what.spec, name=what.name)
    targets = ", ".join(t.name for t in what.spec.targets)
    out.print(f"Run {run.id}: {filled.inserted:,} items (prompts × targets {targets}).")
    if filled.missing_ids:
        out.print(f"warning: no stored prompt has the ids {', '.join(filled.missing_ids[:20])}")
    return run

"""``analysisq run``: a whole run on this machine, on the embedded PostgreSQL by default.

Migrates, imports ``--prompts``, creates and fills the run from ``--spec`` and/or flags (or
takes an unfinished one back with ``--resume``), then hands over to
``analysisq.local.runner.Supervisor``: worker processes, stuck resets, live progress, results.
Exit codes: 0 finished within the failure allowance, 1 too many failures (or an error),
2 bad input or configuration, 3 paused (only paused targets left, or the budget is
exhausted: the summary says the line that continues), 130 interrupted.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console

from analysisq.cli.common import database_url, session
from analysisq.cli.main import Context
from analysisq.cli.output import console, quiet_logs, results_options
from analysisq.local.launch import Launch, launch
from analysisq.local.outcome import RunOutcome, summary
from analysisq.local.runspec import build_spec, parse_budget
from analysisq.settings import Settings

T = TypeVar("T")

#: Flags that shape a new run; ``--resume`` takes the stored spec and refuses them, except
#: ``--target NAME=...``, which corrects a target of the run (a misspelt model).
_SPEC_FLAGS = {
    "spec_file": "--spec",
    "prompts_file": "--prompts",
    "tags": "--tag",
    "batch_size": "--batch-size",
    "max_attempts": "--max-attempts",
    "lease_seconds": "--lease-seconds",
    "max_failed_ratio": "--max-failed-ratio",
    "rps": "--rps",
    "tpm": "--tpm",
    "timeout": "--timeout",
    "api_key_env": "--api-key-env",
}


def interruptible(work: Coroutine[Any, Any, T], *, resume: str) -> T:
    """``asyncio.run``; a Ctrl-C before the supervisor takes over signals (while importing or
    filling) ends with a message and code 130 instead of a traceback."""
    try:
        return asyncio.run(work)
    except KeyboardInterrupt:
        click.echo(
            "interrupted before the workers started; `analysisq runs` lists the runs and "
            f"`{resume} RUN` continues one",
            err=True,
        )
        raise SystemExit(130) from None


async def _launch(settings: Settings, url: str, out: Console, what: Launch) -> RunOutcome:
    async with session(settings, url, migrate_schema=True) as pool:
        return await launch(settings, url, pool, out, what)


@click.command()
@click.option(
    "--spec",
    "spec_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="YAML with the AnalysisRun spec fields (or a whole AnalysisRun manifest).",
)
@click.option(
    "--prompts",
    "prompts_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Import this CSV or JSONL file first (upsert by id).",
)
@click.option(
    "--prompts-format",
    type=click.Choice(["csv", "jsonl"]),
    help="Format of --prompts (default: from the extension).",
)
@click.option(
    "--target",
    "targets",
    multiple=True,
    metavar="NAME=PROVIDER:MODEL[@ENDPOINT]",
    help="A target; repeatable; replaces the spec's targets (with --resume: corrects the "
    "run's target of that NAME).",
)
@click.option("--tag", "tags", multiple=True, help="Only prompts with one of these tags.")
@click.option("--workers", type=click.IntRange(1, 1000), help="Worker processes (20).")
@click.option("--batch-size", type=click.IntRange(1, 1000), help="Items in flight per worker (5).")
@click.option("--max-attempts", type=click.IntRange(1, 20), help="Attempts per item (3).")
@click.option("--lease-seconds", type=click.IntRange(5, 3600), help="Claim lease (60).")
@click.option(
    "--max-failed-ratio",
    type=click.FloatRange(0, 1),
    help="Failed-for-good share still counted a success (0.01).",
)
@click.option(
    "--rps",
    type=click.FloatRange(min=0, min_open=True),
    help="Requests per second per target, across all workers.",
)
@click.option("--tpm", type=click.IntRange(min=1), help="Tokens per minute per target.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds per provider request (60).",
)
@click.option(
    "--api-key-env",
    metavar="VAR",
    help="Environment variable holding the targets' API key (spec: apiKeyEnv).",
)
@click.option("--name", default="local", show_default=True, help="Run name (the id adds a time).")
@click.option("--resume", metavar="RUN", help="Continue an unfinished run; nothing is redone.")
@click.option(
    "--budget",
    "budget",
    multiple=True,
    metavar="maxCost=N,maxTokens=N",
    help="What the run may spend (spec: budget); with --resume, raises a run's budget.",
)
@results_options("DATA_DIR/runs/RUN/results.jsonl")
@click.pass_obj
def run(obj: Context, /, **flags: Any) -> None:
    """Run a batch of prompt analyses here, with N worker processes and live progress.

    \b
    analysisq run --prompts prompts.csv --target gpt=openai:gpt-4o-mini --rps 20
    analysisq run --spec run.yaml
    analysisq run --resume local-20250101-020000-ab12
    analysisq run --resume local-20250101-020000-ab12 --budget maxCost=40
    analysisq run --resume local-20250101-020000-ab12 --target gpt=openai:gpt-4o-mini
    """
    settings = obj.settings
    resume = flags["resume"]
    budget = parse_budget(list(flags["budget"]))
    spec = None
    if resume is not None:
        given = [flag for key, flag in _SPEC_FLAGS.items() if flags[key]]
        if given:
            raise click.UsageError(
                f"--resume continues the stored run as it is; drop {', '.join(given)}"
            )
    else:
        spec = build_spec(
            flags["spec_file"],
            list(flags["targets"]),
            tags=list(flags["tags"]),
            requests_per_second=flags["rps"],
            tokens_per_minute=flags["tpm"],
            timeout_seconds=flags["timeout"],
            api_key_env=flags["api_key_env"],
            workers=flags["workers"],
            batch_size=flags["batch_size"],
            max_attempts=flags["max_attempts"],
            lease_seconds=flags["lease_seconds"],
            max_failed_ratio=flags["max_failed_ratio"],
            budget=budget,
        )
    quiet_logs(settings)
    url = database_url(settings)
    out = console()
    what = Launch(
        spec=spec,
        name=flags["name"],
        resume=resume,
        fixed_targets=tuple(flags["targets"]) if resume is not None else (),
        prompts_file=flags["prompts_file"],
        prompts_format=flags["prompts_format"],
        workers=flags["workers"],
        output=flags["output"],
        output_format=flags["output_format"],
        budget=budget if resume is not None else None,
    )
    outcome = interruptible(_launch(settings, url, out, what), resume="analysisq run --resume")
    for line in summary(outcome):
        out.print(line, soft_wrap=True)
    raise SystemExit(outcome.exit_code)


COMMANDS = [run]

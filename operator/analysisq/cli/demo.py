"""``analysisq demo``: the README's first command — a daily run on this machine, start to end.

See ``analysisq.local.demo`` for what it sets up; ``analysisq run`` does the same against a
real provider.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from analysisq.cli.common import database_url, session
from analysisq.cli.main import Context
from analysisq.cli.output import console, quiet_logs
from analysisq.cli.run import interruptible
from analysisq.local.outcome import Ending, summary

if TYPE_CHECKING:
    from analysisq.local.demo import DemoResult


@click.command()
@click.option(
    "--prompts",
    "n_prompts",
    default=10_000,
    show_default=True,
    type=click.IntRange(1, 10_000),
    help="How many sample prompts (at most 10,000).",
)
@click.option(
    "--workers",
    default=20,
    show_default=True,
    type=click.IntRange(1, 1000),
    help="Worker processes (the seed's NUM_WORKERS).",
)
@click.option(
    "--rps",
    default=100.0,
    show_default=True,
    type=click.FloatRange(min=1),
    help="Requests per second the run may send (the fake caps at 1.2×).",
)
@click.option("--resume", metavar="RUN", help="Continue an interrupted demo run.")
@click.pass_obj
def demo(obj: Context, n_prompts: int, workers: int, rps: float, resume: str | None) -> None:
    """Run 10,000 sample prompts through 20 workers against a flaky fake provider.

    Everything is local: an embedded PostgreSQL under the data directory and an
    OpenAI-compatible fake provider on 127.0.0.1 with realistic latency, transient errors,
    429s and a rate cap. Retries recover every item; the results land in a JSONL file.
    """
    # The fake provider (aiohttp) is loaded only here, not in every analysisq process.
    from analysisq.local.demo import fake_lines, next_steps, run_demo

    settings = obj.settings
    quiet_logs(settings)
    out = console()
    out.print("Starting the database (embedded PostgreSQL unless DATABASE_URL is set)...")
    url = database_url(settings)

    async def go() -> DemoResult:
        async with session(settings, url, migrate_schema=True) as pool:
            return await run_demo(
                settings,
                url,
                pool,
                out,
                prompts=n_prompts,
                workers=workers,
                rps=rps,
                resume=resume,
            )

    result = interruptible(go(), resume="analysisq demo --resume")
    outcome = result.outcome
    lines = summary(outcome, resume="analysisq demo --resume")
    if outcome.ending is Ending.FINISHED:
        lines += fake_lines(result.fake) + next_steps(outcome.run.id)
    for line in lines:
        out.print(line, soft_wrap=True)
    raise SystemExit(outcome.exit_code)


COMMANDS = [demo]

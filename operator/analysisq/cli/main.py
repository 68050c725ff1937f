"""The ``analysisq`` command group and the options every command shares.

Errors from the analysisq tree end the command with their message and exit code 2 (bad input
or configuration) or 1 (anything else), never a traceback with secrets in it.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

from analysisq import __version__
from analysisq.errors import AnalysisqError, ConfigError, InputError
from analysisq.logs import setup_logging
from analysisq.settings import Settings, load_settings


class Context:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings


#: Command name -> the module that defines it (in its ``COMMANDS`` list). Modules are imported
#: only when their command runs, so a worker process never loads kopf, kubernetes or rich.
LAZY_COMMANDS = {
    "migrate": "migrate",
    "worker": "worker",
    "run": "run",
    "demo": "demo",
    "status": "runbook",
    "stuck": "runbook",
    "failed": "runbook",
    "errors": "runbook",
    "cleanup": "repair",
    "runs": "runbook",
    "results": "runbook",
    "targets": "repair",
    "retry": "repair",
    "prompts": "prompts",
    "prune": "prune",
    "fake-provider": "fake_provider",
    "trigger": "trigger",
    "operator": "operator",
    "dashboard": "dashboard",
}


class AnalysisqGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(LAZY_COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        module_name = LAZY_COMMANDS.get(cmd_name)
        if module_name is None:
            return None
        module = importlib.import_module(f"analysisq.cli.{module_name}")
        for command in module.COMMANDS:
            if command.name == cmd_name:
                return command  # type: ignore[no-any-return]
        raise RuntimeError(f"analysisq.cli.{module_name} does not define {cmd_name!r}")

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (ConfigError, InputError) as exc:
            click.echo(f"error: {exc.message}", err=True)
            sys.exit(2)
        except AnalysisqError as exc:
            click.echo(f"error: {exc.message}", err=True)
            sys.exit(1)


@click.group(cls=AnalysisqGroup)
@click.version_option(__version__, prog_name="analysisq")
@click.option("--database-url", envvar=None, help="PostgreSQL URL (env DATABASE_URL).")
@click.option(
    "--database-pooler",
    type=click.Choice(["none", "transaction"]),
    help="A pooler in transaction mode sits in front (env ANALYSISQ_DATABASE_POOLER).",
)
@click.option("--data-dir", type=click.Path(), help="Local state: embedded database, results.")
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]))
@click.option("--log-format", type=click.Choice(["json", "text"]))
@click.pass_context
def cli(
    ctx: click.Context,
    database_url: str | None,
    database_pooler: str | None,
    data_dir: str | None,
    log_level: str | None,
    log_format: str | None,
) -> None:
    """analysisq: daily LLM prompt analyses on a PostgreSQL work queue."""
    try:
        settings = load_settings(
            database_url=database_url,
            database_pooler=database_pooler,
            data_dir=data_dir,
            log_level=log_level,
            log_format=log_format,
        )
    except ConfigError as exc:
        raise click.UsageError(exc.message) from None
    setup_logging(settings.log_level, settings.log_format)
    ctx.obj = Context(settings)


def main() -> None:
    cli(prog_name="analysisq")

"""Output for people and for scripts: rich tables, or JSON with ``--json``; the database
session the commands share is ``cli.common``."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Sequence
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

from analysisq.settings import Settings

F = TypeVar("F", bound=Callable[..., Any])


def json_option(command: F) -> F:
    """``--json``: machine-readable output instead of tables."""
    return click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")(command)


def results_options(default_output: str) -> Callable[[F], F]:
    """``--output FILE`` and ``--format jsonl|csv`` for the commands that write results."""

    def decorate(command: F) -> F:
        command = click.option(
            "--format",
            "output_format",
            type=click.Choice(["jsonl", "csv"]),
            help="Results format (default: from --output's extension, else jsonl).",
        )(command)
        return click.option(
            "--output",
            type=click.Path(dir_okay=False, path_type=Path),
            help=f"Results file (default: {default_output}).",
        )(command)

    return decorate


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    if callable(as_dict := getattr(value, "as_dict", None)):
        return as_dict()  # the names outside Python (Counts: failed, not failed_for_good)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, default=_default, indent=2, ensure_ascii=False))


def console(*, stderr: bool = False) -> Console:
    """Rich output without markup; 120 columns when not a terminal (logs, pipes)."""
    out = Console(stderr=stderr, highlight=False, markup=False)
    if not out.is_terminal:
        out.width = max(out.width, 120)
    return out


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return f"{value:%Y-%m-%d %H:%M}"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(
    title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], *, wrap: Sequence[str] = ()
) -> Table:
    """A table for people; only the *wrap* columns (free text) may wrap."""
    t = Table(
        title=title,
        title_justify="left",
        show_edge=False,
        caption=None if rows else "none",
        min_width=len(title),
    )
    for c in columns:
        t.add_column(c, no_wrap=c not in wrap, overflow="fold")
    for row in rows:
        t.add_row(*(cell(v) for v in row))
    return t


def quiet_logs(settings: Settings) -> None:
    """Commands for people print what matters themselves: only warnings from this process."""
    logging.getLogger().setLevel(max(logging.WARNING, logging.getLevelName(settings.log_level)))

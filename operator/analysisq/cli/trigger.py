"""``analysisq trigger``: create the day's AnalysisRun from a template (the daily CronJob).

The rules (names, AlreadyExists, pruning) live in ``analysisq.kube.trigger``; this module
hands the flags to :class:`~analysisq.settings.TriggerSettings`, which validates them together
with their ``ANALYSISQ_TRIGGER_*`` variables (a flag wins; the chart sets the variables), and
prints what happened.
"""

from __future__ import annotations

import asyncio

import click

from analysisq.cli.main import Context
from analysisq.kube.trigger import trigger
from analysisq.settings import TriggerSettings, load


def _default(name: str) -> object:
    return TriggerSettings.model_fields[name].default


@click.command("trigger")
@click.option(
    "--namespace",
    help="Where the run and its template live (default: the pod's or kubeconfig's namespace).",
)
@click.option("--template-configmap", help="The ConfigMap holding the run template (required).")
@click.option(
    "--template-key",
    help="Its key: YAML, a bare spec or an AnalysisRun manifest "
    f"[default: {_default('template_key')}].",
)
@click.option(
    "--prefix",
    help="Runs are named <prefix>-YYYYMMDD and labelled "
    f"analysisq.io/trigger=<prefix> [default: {_default('prefix')}].",
)
@click.option(
    "--date", "day", help="The UTC day to create the run for, YYYY-MM-DD (backfill); default today."
)
@click.option(
    "--keep",
    type=int,
    help="Finished runs of this prefix to keep; older finished ones are deleted "
    f"[default: {_default('keep')}].",
)
@click.option("--no-prune", is_flag=True, default=None, help="Delete nothing.")
@click.option(
    "--deadline-in",
    help="Set spec.deadline this long after now (6h, 90m, 1d12h), replacing the template's.",
)
@click.pass_obj
def trigger_command(
    obj: Context,
    namespace: str | None,
    template_configmap: str | None,
    template_key: str | None,
    prefix: str | None,
    day: str | None,
    keep: int | None,
    no_prune: bool | None,
    deadline_in: str | None,
) -> None:
    """Create today's AnalysisRun <prefix>-YYYYMMDD (UTC) from a template; prune old ones.

    A run that already exists counts as success, so the command can run twice a day. Every
    flag has an ANALYSISQ_TRIGGER_* variable (ANALYSISQ_TRIGGER_TEMPLATE_CONFIGMAP, ...).
    """
    flags = {
        "namespace": namespace,
        "template_configmap": template_configmap,
        "template_key": template_key,
        "prefix": prefix,
        "date": day,
        "keep": keep,
        "no_prune": no_prune,
        "deadline_in": deadline_in,
    }
    options = load(TriggerSettings, flags, flags=True)
    result = asyncio.run(trigger(options))
    where = f"{result.namespace}/{result.name}"
    if result.created:
        click.echo(f"analysisrun {where} created")
    else:
        click.echo(f"analysisrun {where} already exists; nothing created")
    for name in result.pruned:
        click.echo(f"analysisrun {result.namespace}/{name} pruned")


COMMANDS = [trigger_command]

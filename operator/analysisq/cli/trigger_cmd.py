"""``analysisq trigger``: create the day's AnalysisRun from a template (the daily CronJob).

The rules (names, AlreadyExists, pruning) live in ``analysisq.trigger``; this module maps
flags and their environment variables onto :class:`~analysisq.trigger.TriggerOptions` and
prints what happened. Every flag has an ``ANALYSISQ_TRIGGER_*`` variable so the chart can set
them from values without building an argument list.
"""

from __future__ import annotations

import click

from analysisq.cli.main import Context
from analysisq.trigger import (
    TriggerOptions,
    check_prefix,
    default_namespace,
    parse_day,
    parse_duration,
    trigger,
)


@click.command("trigger")
@click.option(
    "--namespace",
    envvar="ANALYSISQ_TRIGGER_NAMESPACE",
    help="Where the run and its template live (default: the pod's or kubeconfig's namespace).",
)
@click.option(
    "--template-configmap",
    required=True,
    envvar="ANALYSISQ_TRIGGER_TEMPLATE_CONFIGMAP",
    help="The ConfigMap holding the run template.",
)
@click.option(
    "--template-key",
    default="spec.yaml",
    show_default=True,
    envvar="ANALYSISQ_TRIGGER_TEMPLATE_KEY",
    help="Its key: YAML, a bare spec or an AnalysisRun manifest.",
)
@click.option(
    "--prefix",
    default="daily",
    show_default=True,
    envvar="ANALYSISQ_TRIGGER_PREFIX",
    help="Runs are named <prefix>-YYYYMMDD and labelled analysisq.io/trigger=<prefix>.",
)
@click.option(
    "--date",
    "day",
    envvar="ANALYSISQ_TRIGGER_DATE",
    help="The UTC day to create the run for, YYYY-MM-DD (backfill); default today.",
)
@click.option(
    "--keep",
    type=click.IntRange(min=0),
    default=30,
    show_default=True,
    envvar="ANALYSISQ_TRIGGER_KEEP",
    help="Finished runs of this prefix to keep; older finished ones are deleted.",
)
@click.option(
    "--no-prune",
    is_flag=True,
    envvar="ANALYSISQ_TRIGGER_NO_PRUNE",
    help="Delete nothing.",
)
@click.option(
    "--deadline-in",
    envvar="ANALYSISQ_TRIGGER_DEADLINE_IN",
    help="Set spec.deadline this long after now (6h, 90m, 1d12h), replacing the template's.",
)
@click.pass_obj
def trigger_command(
    obj: Context,
    namespace: str | None,
    template_configmap: str,
    template_key: str,
    prefix: str,
    day: str | None,
    keep: int,
    no_prune: bool,
    deadline_in: str | None,
) -> None:
    """Create today's AnalysisRun <prefix>-YYYYMMDD (UTC) from a template; prune old ones.

    A run that already exists counts as success, so the command can run twice a day.
    """
    options = TriggerOptions(
        namespace=namespace or default_namespace(),
        template_configmap=template_configmap,
        template_key=template_key,
        prefix=check_prefix(prefix),
        day=parse_day(day) if day else None,
        keep=None if no_prune else keep,
        deadline_in=parse_duration(deadline_in) if deadline_in else None,
    )
    result = trigger(options)
    where = f"{result.namespace}/{result.name}"
    if result.created:
        click.echo(f"analysisrun {where} created")
    else:
        click.echo(f"analysisrun {where} already exists; nothing created")
    for name in result.pruned:
        click.echo(f"analysisrun {result.namespace}/{name} pruned")


COMMANDS = [trigger_command]

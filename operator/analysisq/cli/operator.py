"""``analysisq operator``: run the Kubernetes operator (see docs/operator.md)."""

from __future__ import annotations

import asyncio

import click

from analysisq.cli.main import Context
from analysisq.errors import ConfigError
from analysisq.settings import load_settings


@click.command("operator")
@click.option(
    "--namespace",
    "namespaces",
    multiple=True,
    help="Watch only this namespace (repeatable; env ANALYSISQ_NAMESPACES, comma-separated).",
)
@click.option("--worker-image", help="Image of the worker pods (env ANALYSISQ_WORKER_IMAGE).")
@click.option("--reconcile-seconds", type=float, help="Status refresh interval of active runs.")
@click.option("--stuck-reset-seconds", type=float, help="Stuck-item reset interval (≤ 3600).")
@click.option("--health-port", type=int, help="Liveness endpoint port, 0 = off.")
@click.option("--metrics-port", type=int, help="Prometheus /metrics port, 0 = off.")
@click.pass_obj
def operator(
    obj: Context,
    namespaces: tuple[str, ...],
    worker_image: str | None,
    reconcile_seconds: float | None,
    stuck_reset_seconds: float | None,
    health_port: int | None,
    metrics_port: int | None,
) -> None:
    """Watch AnalysisRuns: fill queues, run worker Deployments, report status."""
    from analysisq.kube.startup import run_operator

    flags = {
        "namespaces": ",".join(namespaces) if namespaces else None,
        "worker_image": worker_image,
        "reconcile_seconds": reconcile_seconds,
        "stuck_reset_seconds": stuck_reset_seconds,
        "health_port": health_port,
        "metrics_port": metrics_port,
    }
    given = {k: v for k, v in flags.items() if v is not None}
    try:
        settings = load_settings(**{**obj.settings.model_dump(exclude_unset=True), **given})
    except ConfigError as exc:
        raise click.UsageError(exc.message) from None
    asyncio.run(run_operator(settings))


COMMANDS = [operator]

"""Start the operator: settings, schema check, liveness, metrics, then kopf.

``run_operator`` is what ``analysisq operator`` calls. In order:

1. refuse to start on a database whose schema is not this code's (``SchemaMismatch``); a
   database that is only unreachable is waited for by the runs, not by start-up, so a
   database outage never turns into an operator crash loop;
2. serve Prometheus metrics on ``metrics_port`` and the dashboard on ``dashboard_port``;
3. run kopf with ``kopf_settings``: the finalizer ``analysisq.io/finalizer``, its state
   annotations under ``operator.analysisq.io``, watch timeouts, Events from our own posts
   only, and standalone mode.

High availability: one replica with the ``Recreate`` strategy, not kopf peering (see
docs/operator.md). The operator is not in the data path: workers keep draining the queue and
rescuing stuck items while it restarts, and every write it makes is idempotent, so the short
gap of a restart costs only status freshness. Peering would add a CRD, RBAC and a
60-second failover with no stronger guarantee than one replica.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading

import kopf

from analysisq.errors import ConfigError, DatabaseTransient
from analysisq.kube import dashboard, handlers
from analysisq.kube.databases import DatabasePools
from analysisq.kube.kubeapi import KubeApi, load_client
from analysisq.kube.metrics import Metrics
from analysisq.kube.ref import GROUP
from analysisq.kube.service import RunService
from analysisq.settings import Settings

log = logging.getLogger("analysisq.operator")

#: Where kopf keeps its per-object state (annotations): under analysisq.io, not on it.
STORAGE_PREFIX = f"operator.{GROUP}"


def kopf_settings(settings: Settings) -> kopf.OperatorSettings:
    ks = kopf.OperatorSettings()
    ks.persistence.finalizer = f"{GROUP}/finalizer"
    # kopf ignores every annotation under its storage prefix when it looks for changes, so its
    # state lives under a sub-domain and `analysisq.io/...` stays free for people's annotations
    # (analysisq.io/resume-targets).
    ks.persistence.progress_storage = kopf.AnnotationsProgressStorage(
        prefix=STORAGE_PREFIX, v1=False
    )
    # spec.prompts cannot change (CEL) and may be long: keep it out of the diff-base annotation.
    ks.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=STORAGE_PREFIX, v1=False, ignored_fields=["spec.prompts"]
    )
    ks.watching.server_timeout = settings.watch_server_timeout
    ks.watching.client_timeout = settings.watch_client_timeout
    ks.watching.connect_timeout = 10
    ks.networking.request_timeout = 60
    ks.networking.connect_timeout = 10
    # Our handlers post the Events a person needs; kopf's own log lines stay in the log.
    ks.posting.level = logging.WARNING
    ks.posting.reporting_component = "analysisq-operator"
    ks.posting.reporting_instance = os.environ.get("POD_NAME") or socket.gethostname()
    ks.peering.standalone = True
    return ks


class _KopfFields(logging.Filter):
    """kopf's per-object log fields as one ``object`` field (and not its settings object)."""

    def filter(self, record: logging.LogRecord) -> bool:
        ref = record.__dict__.pop("k8s_ref", None)
        record.__dict__.pop("k8s_skip", None)
        record.__dict__.pop("settings", None)
        if isinstance(ref, dict) and ref.get("name"):
            record.object = f"{ref.get('namespace')}/{ref.get('name')}"
        return True


def configure_logging(settings: Settings) -> None:
    """Structured logs: kopf's object fields flattened; per-tick chatter only at DEBUG."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(_KopfFields())
    if settings.log_level != "DEBUG":
        # "Timer 'reconcile' succeeded" for every run on every tick, and every probe request.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def namespaces(settings: Settings) -> list[str]:
    return [n.strip() for n in settings.namespaces.split(",") if n.strip()]


async def run_operator(
    settings: Settings,
    *,
    stop_flag: asyncio.Event | threading.Event | None = None,
    ready_flag: asyncio.Event | threading.Event | None = None,
) -> None:
    """Run until SIGTERM/SIGINT (or *stop_flag*); raises ``SchemaMismatch`` at start."""
    if not settings.database_url:
        raise ConfigError("the operator needs DATABASE_URL (its default database)")
    configure_logging(settings)
    pools = DatabasePools(pooler=settings.database_pooler)
    try:
        await pools.get(settings.database_url)
    except DatabaseTransient as exc:
        log.warning("runs wait for the default database", extra={"error": exc.message})
    kube = KubeApi(load_client())
    metrics = Metrics(settings.provider_metrics_seconds)
    server = metrics.serve(settings.metrics_port) if settings.metrics_port else None
    service = RunService(settings, kube, pools, metrics)
    page = await dashboard.serve(settings, kube) if settings.dashboard_port else None
    registry = kopf.OperatorRegistry()
    handlers.register(registry, service, settings)
    watched = namespaces(settings)
    liveness = f"http://0.0.0.0:{settings.health_port}/healthz" if settings.health_port else None
    log.info(
        "operator starting",
        extra={
            "namespaces": watched or "all",
            "liveness": liveness,
            "metrics_port": settings.metrics_port or None,
            "dashboard_port": settings.dashboard_port or None,
            "reconcile_seconds": settings.reconcile_seconds,
            "stuck_reset_seconds": settings.stuck_reset_seconds,
        },
    )
    try:
        await kopf.operator(
            registry=registry,
            settings=kopf_settings(settings),
            standalone=True,
            clusterwide=not watched,
            namespaces=watched,
            liveness_endpoint=liveness,
            stop_flag=stop_flag,
            ready_flag=ready_flag,
        )
    finally:
        if server is not None:
            server.shutdown()
        if page is not None:
            await page.cleanup()
        kube.close()
        await pools.close()
        log.info("operator stopped")

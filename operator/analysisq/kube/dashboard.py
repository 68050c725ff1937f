"""The dashboard inside the operator: the same app, read-only unless a token is configured.

``serve`` starts ``analysisq.dashboard`` on ``dashboard_port`` in the operator's event loop,
over the operator's default database (runs with their own ``databaseSecretRef`` live
elsewhere and are not shown). Actions need ``dashboard_action_token`` (from the chart's
Secret), and go through the AnalysisRun, never behind the operator's back:
``ClusterActions`` patches ``spec.suspend``, the resume-targets or the retry-failed
annotation (``kube.retries``), and the operator does the rest.
"""

from __future__ import annotations

import secrets
from typing import Any

from aiohttp import web

from analysisq.dashboard.actions import RESUME, RESUME_TARGET, RETRY, SUSPEND, RetryFilter
from analysisq.dashboard.app import start
from analysisq.dashboard.context import DashboardContext
from analysisq.dashboard.errors import BadParameter
from analysisq.dashboard.guard import Guard
from analysisq.errors import RunNotFound
from analysisq.kube.deployment import RESUME_ANNOTATION
from analysisq.kube.kubeapi import KubeApi
from analysisq.kube.ref import RunRef
from analysisq.kube.retries import RETRY_ANNOTATION
from analysisq.settings import Settings


def run_ref(run_id: str) -> RunRef:
    """The AnalysisRun behind a database run id ``namespace/name/uid``."""
    parts = run_id.split("/")
    if len(parts) != 3 or not all(parts):
        raise BadParameter(f"run {run_id!r} was not created by an AnalysisRun")
    return RunRef(namespace=parts[0], name=parts[1], uid=parts[2])


class ClusterActions:
    """Actions as changes to the AnalysisRun, for the operator to carry out."""

    available = frozenset({RETRY, SUSPEND, RESUME, RESUME_TARGET})

    def __init__(self, kube: KubeApi) -> None:
        self._kube = kube

    async def _patch(self, run_id: str, patch: dict[str, Any]) -> None:
        ref = run_ref(run_id)
        if not await self._kube.patch_run(ref, patch):
            raise RunNotFound(f"AnalysisRun {ref.display_name} is gone (or was recreated)")

    async def retry_failed(
        self, ctx: DashboardContext, run_id: str, which: RetryFilter
    ) -> dict[str, Any]:
        # The annotation's filter syntax (kube.retries.parse_retry_request); the operator
        # retries, reopens a finished run and removes the annotation.
        if which.error and "," in which.error:
            raise BadParameter("in the cluster the error filter cannot contain a comma")
        parts = [
            f"{key}={value}"
            for key, value in (
                ("class", which.error_class),
                ("target", which.target),
                ("error", which.error),
            )
            if value
        ]
        value = ",".join(parts) or "all"
        await self._patch(run_id, {"metadata": {"annotations": {RETRY_ANNOTATION: value}}})
        return {"retried": None, "requested": value}

    async def resume_target(
        self, ctx: DashboardContext, run_id: str, target: str | None
    ) -> dict[str, Any]:
        # The operator resumes every paused target of the run once its workers restarted
        # with the current keys (kube.service.resume_targets).
        token = secrets.token_hex(8)
        await self._patch(run_id, {"metadata": {"annotations": {RESUME_ANNOTATION: token}}})
        return {"resumed": ["every paused target (the operator restarts the workers first)"]}

    async def set_suspended(
        self, ctx: DashboardContext, run_id: str, suspended: bool
    ) -> dict[str, Any]:
        await self._patch(run_id, {"spec": {"suspend": suspended}})
        return {"suspend": suspended}


def context_for(settings: Settings, kube: KubeApi) -> DashboardContext:
    assert settings.database_url is not None
    token = settings.dashboard_action_token
    guard = Guard.create(
        allowed_hosts=[h.strip() for h in settings.dashboard_allowed_hosts.split(",") if h.strip()],
        allow_actions=token is not None,
        action_token=token,
    )
    return DashboardContext(settings.database_url, guard, ClusterActions(kube))


async def serve(settings: Settings, kube: KubeApi) -> web.AppRunner:
    """Serve the dashboard on all addresses of the pod (the Service's target port)."""
    runner, _port = await start(context_for(settings, kube), "0.0.0.0", settings.dashboard_port)
    return runner

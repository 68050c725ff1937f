"""The dashboard's POSTs, and the two places an action can be carried out.

``POST /api/runs/{id}/retry`` (body ``{"error_class": ..., "target": ..., "error": ...}``,
each optional), ``/resume-target`` (``{"target": ...}``), ``/suspend`` and ``/resume``. The
guard (``analysisq.dashboard.guard``) has already refused cross-site requests and disabled
actions before a handler runs.

Where an action goes depends on who owns the run: ``LocalActions`` writes to the database
through the queue layer, as ``analysisq retry`` and ``analysisq targets resume`` do; a local
run has no suspend (stop ``analysisq run`` and ``--resume`` it). ``ClusterActions`` never
goes behind the operator's back: it patches the AnalysisRun (``spec.suspend``, the
resume-targets annotation) and the operator does the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web

from analysisq.dashboard.api import reply, run_id_of
from analysisq.dashboard.context import DashboardContext, context
from analysisq.dashboard.errors import ActionUnavailable, BadParameter
from analysisq.errors import ErrorClass, RunNotFound
from analysisq.queue import dashboard as panels
from analysisq.queue import retries, runs

RETRY, RESUME_TARGET, SUSPEND, RESUME = "retry", "resume-target", "suspend", "resume"


@dataclass(frozen=True)
class RetryFilter:
    """Which failed-for-good items to retry (each field narrows; none = all of the run)."""

    error_class: str | None = None
    target: str | None = None
    error: str | None = None


class Actions(Protocol):
    #: the actions this backend can carry out
    available: frozenset[str]

    async def retry_failed(
        self, ctx: DashboardContext, run_id: str, which: RetryFilter
    ) -> dict[str, Any]: ...

    async def resume_target(
        self, ctx: DashboardContext, run_id: str, target: str | None
    ) -> dict[str, Any]: ...

    async def set_suspended(
        self, ctx: DashboardContext, run_id: str, suspended: bool
    ) -> dict[str, Any]: ...


class LocalActions:
    """Actions on a local (or any non-cluster) run, straight through the queue layer."""

    available = frozenset({RETRY, RESUME_TARGET})

    async def retry_failed(
        self, ctx: DashboardContext, run_id: str, which: RetryFilter
    ) -> dict[str, Any]:
        async with ctx.connection() as conn:
            retried = await retries.retry_failed(
                conn, run_id, error_class=which.error_class, target=which.target, error=which.error
            )
        return {"retried": retried}

    async def resume_target(
        self, ctx: DashboardContext, run_id: str, target: str | None
    ) -> dict[str, Any]:
        async with ctx.connection() as conn:
            return {"resumed": await runs.resume_targets(conn, run_id, target)}

    async def set_suspended(
        self, ctx: DashboardContext, run_id: str, suspended: bool
    ) -> dict[str, Any]:
        raise ActionUnavailable(
            "a local run has no suspend: stop `analysisq run` (Ctrl-C) and continue it with "
            "`analysisq run --resume`"
        )


def _body_text(body: dict[str, Any], name: str, *, choices: set[str] | None = None) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > 500:
        raise BadParameter(f"body field {name!r} must be a non-empty string (≤ 500 characters)")
    if choices is not None and value not in choices:
        raise BadParameter(f"body field {name}={value!r} is not one of {sorted(choices)}")
    return value


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json() if request.can_read_body else {}
    except ValueError:
        raise BadParameter("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadParameter("the request body must be a JSON object")
    return body


async def _known_run(request: web.Request, action: str) -> tuple[DashboardContext, str]:
    ctx, run_id = context(request), run_id_of(request)
    if action not in ctx.actions.available:
        raise ActionUnavailable(f"{action} is not available on this dashboard")
    async with ctx.connection() as conn:
        if not await panels.run_exists(conn, run_id):
            raise RunNotFound(f"no run {run_id!r}")
    return ctx, run_id


async def retry(request: web.Request) -> web.Response:
    body = await _body(request)
    ctx, run_id = await _known_run(request, RETRY)
    which = RetryFilter(
        error_class=_body_text(body, "error_class", choices={c.value for c in ErrorClass}),
        target=_body_text(body, "target"),
        error=_body_text(body, "error"),
    )
    result = await ctx.actions.retry_failed(ctx, run_id, which)
    return reply({"run": run_id, **result})


async def resume_target(request: web.Request) -> web.Response:
    body = await _body(request)
    ctx, run_id = await _known_run(request, RESUME_TARGET)
    result = await ctx.actions.resume_target(ctx, run_id, _body_text(body, "target"))
    return reply({"run": run_id, **result})


async def suspend(request: web.Request) -> web.Response:
    ctx, run_id = await _known_run(request, SUSPEND)
    return reply({"run": run_id, **await ctx.actions.set_suspended(ctx, run_id, True)})


async def resume(request: web.Request) -> web.Response:
    ctx, run_id = await _known_run(request, RESUME)
    return reply({"run": run_id, **await ctx.actions.set_suspended(ctx, run_id, False)})


def add_routes(app: web.Application) -> None:
    run = "/api/runs/{run_id:.+}"
    app.router.add_post(f"{run}/retry", retry)
    app.router.add_post(f"{run}/resume-target", resume_target)
    app.router.add_post(f"{run}/suspend", suspend)
    app.router.add_post(f"{run}/resume", resume)

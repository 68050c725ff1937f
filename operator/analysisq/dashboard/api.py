"""The JSON API the page polls: runs, one run, and one endpoint per panel.

``GET /api/runs``, ``/api/runs/{id}``, ``/api/runs/{id}/timeline``, ``/targets``,
``/errors``, ``/failed``, ``/stuck``, ``/batches``. Each handler validates its query
parameters (400 with the parameter's name), runs one panel query of
``analysisq.queue.dashboard`` (plus a primary key lookup so an unknown run is 404), and
answers JSON. Prompts appear only as excerpts and
error messages pass through ``redact``: the API never returns a full prompt, an answer, a key
or a database URL. ``analysisq.dashboard.actions`` holds the POSTs.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from datetime import datetime
from decimal import Decimal
from typing import Any

import asyncpg
from aiohttp import web

from analysisq.dashboard.context import DashboardContext, context
from analysisq.dashboard.errors import BadParameter
from analysisq.errors import RunNotFound, redact
from analysisq.queue import batches as provider_batches
from analysisq.queue import dashboard as panels
from analysisq.queue import monitor
from analysisq.queue.dashboard import RunSummary

#: Characters of a prompt the dashboard shows (never the whole prompt, never an answer).
EXCERPT_CHARS = 160


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def reply(data: Any) -> web.Response:
    return web.json_response(data, dumps=lambda d: json.dumps(d, default=_default))


def int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadParameter(f"query parameter {name}={raw!r} is not an integer") from None
    if not low <= value <= high:
        raise BadParameter(f"query parameter {name}={value} is outside {low}..{high}")
    return value


def run_json(run: RunSummary) -> dict[str, Any]:
    return {
        "id": run.id,
        "name": run.name,
        "phase": run.phase,
        "created_at": run.created_at,
        "filled_at": run.filled_at,
        "finished_at": run.finished_at,
        "counts": run.counts.as_dict(),
        "progress": run.counts.progress,
        "throughput": run.throughput,
        "eta_seconds": run.eta_seconds,
        "paused_targets": run.paused_targets,
        "cost": run.cost,
    }


def run_id_of(request: web.Request) -> str:
    return request.match_info["run_id"]


async def _known(ctx: DashboardContext, run_id: str) -> None:
    async with ctx.connection() as conn:
        if not await panels.run_exists(conn, run_id):
            raise RunNotFound(f"no run {run_id!r}")


async def list_runs(request: web.Request) -> web.Response:
    limit = int_param(request, "limit", 20, 1, 200)
    async with context(request).connection() as conn:
        rows = await panels.run_summaries(conn, limit, context(request).finished)
    return reply({"runs": [run_json(r) for r in rows]})


async def get_run(request: web.Request) -> web.Response:
    ctx, run_id = context(request), run_id_of(request)
    async with ctx.connection() as conn:
        run = await panels.run_summary(conn, run_id)
    if run is None:
        raise RunNotFound(f"no run {run_id!r}")
    return reply({"run": run_json(run), "actions": ctx.actions_json()})


async def _panel(
    request: web.Request,
    key: str,
    read: Callable[[asyncpg.Connection, str], Awaitable[list[dict[str, Any]]]],
    *,
    redacted: str | None = None,
) -> web.Response:
    """One panel of a known run: ``{"run": id, key: rows}``, *redacted* field redacted."""
    ctx, run_id = context(request), run_id_of(request)
    await _known(ctx, run_id)
    async with ctx.connection() as conn:
        rows = await read(conn, run_id)
    if redacted is not None:
        for row in rows:
            if row[redacted] is not None:
                row[redacted] = redact(row[redacted])
    return reply({"run": run_id, key: rows})


async def timeline(request: web.Request) -> web.Response:
    buckets = int_param(request, "buckets", 60, 2, 500)
    return await _panel(request, "points", lambda c, r: panels.timeline(c, r, buckets))


async def targets(request: web.Request) -> web.Response:
    return await _panel(request, "targets", panels.target_stats, redacted="pause_reason")


async def errors(request: web.Request) -> web.Response:
    limit = int_param(request, "limit", 20, 1, 200)
    return await _panel(
        request,
        "errors",
        lambda c, r: monitor.error_summary(c, r, limit),
        redacted="error_message",
    )


async def failed(request: web.Request) -> web.Response:
    limit = int_param(request, "limit", 20, 1, 200)
    return await _panel(
        request,
        "items",
        lambda c, r: panels.failed_items(c, r, limit, EXCERPT_CHARS),
        redacted="error_message",
    )


async def stuck(request: web.Request) -> web.Response:
    limit = int_param(request, "limit", 20, 1, 200)
    older_than = int_param(request, "older_than", 900, 1, 86400)
    return await _panel(request, "items", lambda c, r: panels.stuck_items(c, r, older_than, limit))


async def batches(request: web.Request) -> web.Response:
    """Items waiting inside provider batches and each open batch (targets in mode batch)."""
    ctx, run_id = context(request), run_id_of(request)
    await _known(ctx, run_id)
    async with ctx.connection() as conn:
        summary = await provider_batches.summary(conn, run_id)
        open_ = await provider_batches.open_batches(conn, run_id)
    return reply({"run": run_id, "summary": asdict(summary), "batches": [asdict(b) for b in open_]})


def add_routes(app: web.Application) -> None:
    # Cluster run ids hold slashes (namespace/name/uid): panel routes first, then the run.
    run = "/api/runs/{run_id:.+}"
    app.router.add_get("/api/runs", list_runs)
    app.router.add_get(f"{run}/timeline", timeline)
    app.router.add_get(f"{run}/targets", targets)
    app.router.add_get(f"{run}/errors", errors)
    app.router.add_get(f"{run}/failed", failed)
    app.router.add_get(f"{run}/stuck", stuck)
    app.router.add_get(f"{run}/batches", batches)
    app.router.add_get(run, get_run)

"""The two HTML pages, rendered on the server: the runs table and one run.

Each page arrives complete with the data of the moment (readable without JavaScript), then
``static/dashboard.js`` refreshes it from the JSON API every ``refresh_seconds`` and draws
the run's chart with the vendored uPlot. Every value is escaped; the CSRF token and the
action settings travel in ``<meta>`` tags that only this origin can read.
"""

from __future__ import annotations

import html
import json
from urllib.parse import quote

from aiohttp import web

from analysisq.dashboard.context import DashboardContext, context
from analysisq.errors import RunNotFound
from analysisq.queue import dashboard as panels
from analysisq.queue.dashboard import RunSummary


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value))


def run_href(run_id: str) -> str:
    return "/runs/" + quote(run_id, safe="/")


def _layout(ctx: DashboardContext, title: str, body: str, page: str, run_id: str = "") -> str:
    meta = {
        "csrf": ctx.guard.csrf_token,
        "refresh": ctx.refresh_seconds,
        "actions": ctx.actions_json(),
        "page": page,
        "run": run_id,
    }
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        "<meta name=viewport content='width=device-width, initial-scale=1'>"
        f"<title>{_e(title)} · analysisq</title>"
        "<link rel=stylesheet href=/static/vendor/uPlot.min.css>"
        "<link rel=stylesheet href=/static/dashboard.css>"
        f"<meta name=analysisq content='{_e(json.dumps(meta))}'>"
        "</head><body><header><a href=/ class=brand>analysisq</a>"
        f"<span id=live class=live>live · every {ctx.refresh_seconds:g} s</span></header>"
        f"<main>{body}</main><div id=toast role=status></div>"
        "<script src=/static/vendor/uPlot.iife.min.js></script>"
        "<script src=/static/dashboard.js></script></body></html>"
    )


def _progress(run: RunSummary) -> str:
    pct = 100 * run.counts.progress
    return (
        f"<div class=bar title='{pct:.1f}%'><span style='width:{pct:.1f}%'></span></div>"
        f"<span class=pct>{pct:.1f}%</span>"
    )


def _run_row(run: RunSummary) -> str:
    c = run.counts
    return (
        f"<tr data-run='{_e(run.id)}'><td><a href='{_e(run_href(run.id))}'>{_e(run.name)}</a></td>"
        f"<td class=phase>{_e(run.phase)}</td><td class=progress>{_progress(run)}</td>"
        f"<td>{c.total}</td><td>{c.pending}</td><td>{c.processing}</td><td>{c.completed}</td>"
        f"<td>{c.retrying}</td><td>{c.failed_for_good}</td><td>{run.throughput:.1f}/s</td>"
        "<td>—</td><td>—</td></tr>"
    )


RUNS_COLUMNS = (
    "run",
    "phase",
    "progress",
    "total",
    "pending",
    "processing",
    "completed",
    "retrying",
    "failed",
    "throughput",
    "ETA",
    "cost",
)


async def runs_page(request: web.Request) -> web.Response:
    ctx = context(request)
    async with ctx.connection() as conn:
        summaries = await panels.run_summaries(conn, 20, ctx.finished)
    head = "".join(f"<th>{c}</th>" for c in RUNS_COLUMNS)
    rows = "".join(_run_row(r) for r in summaries)
    body = (
        "<h1>Runs</h1><table id=runs class=grid>"
        f"<thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"
        + ("" if summaries else "<p class=empty>No runs yet: start one with analysisq run.</p>")
    )
    return web.Response(text=_layout(ctx, "Runs", body, "runs"), content_type="text/html")


_RUN_PANELS = """
<section class=summary>
  <div class=progress>{progress}</div>
  <dl id=counts></dl>
  <div id=run-actions class=actions></div>
</section>
<section><h2>Items over time</h2><div id=chart class=chart></div></section>
<section><h2>Targets</h2><table id=targets class=grid></table></section>
<section><h2>Errors by class and message</h2><table id=errors class=grid></table></section>
<section><h2>Newest failed items</h2><table id=failed class=grid></table></section>
<section><h2>Stuck items</h2><table id=stuck class=grid></table></section>
<section><h2>Provider batches</h2><p id=batch-summary class=sub></p>
<table id=batches class=grid></table></section>
"""


async def run_page(request: web.Request) -> web.Response:
    ctx, run_id = context(request), request.match_info["run_id"]
    async with ctx.connection() as conn:
        run = await panels.run_summary(conn, run_id)
    if run is None:
        raise RunNotFound(f"no run {run_id!r}")
    body = (
        f"<h1>{_e(run.name)} <span id=phase class=phase>{_e(run.phase)}</span></h1>"
        f"<p class=sub>run id {_e(run.id)} · created {_e(run.created_at.isoformat())}</p>"
        + _RUN_PANELS.format(progress=_progress(run))
    )
    return web.Response(text=_layout(ctx, run.name, body, "run", run.id), content_type="text/html")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/", runs_page)
    app.router.add_get("/runs/{run_id:.+}", run_page)

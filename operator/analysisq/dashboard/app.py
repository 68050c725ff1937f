"""The aiohttp application: middleware order, routes, static assets, and serving it.

Requests pass ``errors_middleware`` (no traceback ever reaches the browser), then the
``Guard`` (host names, cross-site POSTs, disabled actions), then a handler of ``page``
(HTML), ``api`` (JSON) or ``actions`` (POST). Assets come from the package's ``static/``
directory, never a CDN: the image runs air-gapped.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from analysisq.dashboard import actions, api, page
from analysisq.dashboard.context import CONTEXT, DashboardContext
from analysisq.dashboard.errors import errors_middleware

STATIC_DIR = Path(__file__).resolve().parent / "static"

_SECURITY_HEADERS = {
    # Our own scripts only; uPlot sets element styles, hence inline styles.
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; form-action 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    for name, value in _SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)


def create_app(ctx: DashboardContext) -> web.Application:
    app = web.Application(middlewares=[errors_middleware, ctx.guard.middleware])
    app[CONTEXT] = ctx
    app.on_response_prepare.append(_security_headers)

    async def close(_app: web.Application) -> None:
        await ctx.close()

    app.on_cleanup.append(close)
    app.router.add_static("/static", STATIC_DIR, follow_symlinks=False)
    actions.add_routes(app)
    api.add_routes(app)
    page.add_routes(app)
    return app


async def start(ctx: DashboardContext, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Serve the app on *host*:*port* (0: any free port); returns the runner and the port."""
    runner = web.AppRunner(create_app(ctx), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    server = site._server
    assert server is not None
    bound = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    return runner, int(bound)

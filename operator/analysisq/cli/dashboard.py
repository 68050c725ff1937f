"""``analysisq dashboard``: serve the web dashboard over the local or configured database."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal

import click

from analysisq.cli.common import database_url
from analysisq.cli.main import Context
from analysisq.dashboard.actions import LocalActions
from analysisq.dashboard.app import start
from analysisq.dashboard.context import DashboardContext
from analysisq.dashboard.guard import LOOPBACK_HOSTS, Guard
from analysisq.db.migrate import check_schema, migrate
from analysisq.errors import DatabaseTransient

log = logging.getLogger("analysisq.dashboard")


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def _prepare_schema(ctx: DashboardContext, embedded: bool) -> None:
    """Migrate our own embedded database, check a given one; a database that is down now
    is not fatal (the page says so until it is back)."""
    try:
        async with ctx.connection() as conn:
            await (migrate(conn) if embedded else check_schema(conn))
    except DatabaseTransient as exc:
        log.warning("serving anyway", extra={"error": exc.message})


async def _serve(ctx: DashboardContext, host: str, port: int, embedded: bool) -> None:
    await _prepare_schema(ctx, embedded)
    runner, bound = await start(ctx, host, port)
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"analysisq dashboard on http://{shown}:{bound}/  (Ctrl-C stops it)", err=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option(
    "--port",
    default=8765,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Port (0: any free port; the line printed at start names it).",
)
@click.option(
    "--allow-actions/--read-only",
    default=None,
    help="Offer retry / resume actions (default: on when bound to loopback).",
)
@click.option(
    "--allowed-host",
    "allowed_hosts",
    multiple=True,
    metavar="NAME",
    help="Another host name the page is reached by (e.g. a proxy's); repeatable.",
)
@click.option(
    "--refresh",
    default=5.0,
    show_default=True,
    type=click.FloatRange(1, 300),
    help="Seconds between the page's updates.",
)
@click.pass_obj
def dashboard(
    obj: Context,
    host: str,
    port: int,
    allow_actions: bool | None,
    allowed_hosts: tuple[str, ...],
    refresh: float,
) -> None:
    """Serve a live web dashboard of the runs (http://127.0.0.1:8765/ by default)."""
    settings = obj.settings
    url = database_url(settings)
    if host not in ("0.0.0.0", "::"):
        allowed_hosts = (*allowed_hosts, host)  # the address itself, as typed in a browser
    guard = Guard.create(
        allowed_hosts=allowed_hosts,
        allow_actions=is_loopback(host) if allow_actions is None else allow_actions,
    )
    ctx = DashboardContext(url, guard, LocalActions(), refresh_seconds=refresh)
    asyncio.run(_serve(ctx, host, port, embedded=not settings.database_url))


COMMANDS = [dashboard]

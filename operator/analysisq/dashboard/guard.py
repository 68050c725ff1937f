"""Who may read and who may act: DNS-rebinding and cross-site request checks, as middleware.

Every request must name an allowed host in ``Host`` (a page of ``evil.example`` whose name
was re-pointed at 127.0.0.1 sends ``Host: evil.example`` and is refused, so it can read
nothing). A POST must also come from this page: the per-process CSRF token that the page
embeds in a ``<meta>`` tag travels in the ``X-CSRF-Token`` header (a cross-site form cannot
set headers, and the token is unreadable to other origins), an ``Origin`` or
``Sec-Fetch-Site`` header that says another site is refused, and the body must be JSON. When
an action token is configured (the operator's Secret), a POST must carry it as well, in
``X-Action-Token``. ``analysisq.dashboard.app`` installs the middleware next.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from aiohttp import web

from analysisq.dashboard.errors import json_error

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: Names that reach a loopback-bound server honestly (a browser, curl, kubectl port-forward).
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def _hostname(host: str) -> str:
    """``Host`` header without its port (``[::1]:8080`` → ``::1``)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


@dataclass(frozen=True)
class Guard:
    """The access policy of one dashboard process."""

    #: host names (no port) the server answers to, besides the loopback names
    allowed_hosts: frozenset[str] = frozenset()
    #: actions allowed at all (``--allow-actions``)
    allow_actions: bool = False
    #: when set, a POST must also carry this secret (the operator's dashboard Secret)
    action_token: str | None = None
    #: per-process CSRF token, embedded in every page
    csrf_token: str = field(default_factory=lambda: secrets.token_urlsafe(32))

    @classmethod
    def create(
        cls,
        *,
        allowed_hosts: Iterable[str] = (),
        allow_actions: bool,
        action_token: str | None = None,
    ) -> Guard:
        return cls(
            allowed_hosts=frozenset(h.lower() for h in allowed_hosts),
            allow_actions=allow_actions,
            action_token=action_token or None,
        )

    def host_allowed(self, host: str | None) -> bool:
        if not host:
            return False
        name = _hostname(host)
        return name in LOOPBACK_HOSTS or name in self.allowed_hosts

    def cross_site_reason(self, request: web.Request) -> str | None:
        """Why this POST did not come from our own page, or None if it did."""
        origin = request.headers.get("Origin")
        if origin is not None and urlsplit(origin).netloc.lower() != request.host.lower():
            return f"Origin {origin!r} is not this dashboard"
        if request.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
            return "the request came from another site"
        if request.content_type != "application/json":
            return "actions take a JSON body (Content-Type: application/json)"
        sent = request.headers.get("X-CSRF-Token", "")
        if not hmac.compare_digest(sent.encode(), self.csrf_token.encode()):
            return "missing or wrong X-CSRF-Token (reload the page)"
        return None

    def action_refusal(self, request: web.Request) -> str | None:
        """Why this action may not run here, or None."""
        if not self.allow_actions:
            return "actions are disabled on this dashboard (start it with --allow-actions)"
        if self.action_token is not None:
            sent = request.headers.get("X-Action-Token", "")
            if not hmac.compare_digest(sent.encode(), self.action_token.encode()):
                return "this action needs the dashboard's action token"
        return None

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not self.host_allowed(request.headers.get("Host")):
            return json_error(
                421, "host_not_allowed", "this dashboard does not answer to that host name"
            )
        if request.method not in ("GET", "HEAD"):
            reason = self.cross_site_reason(request)
            if reason is not None:
                return json_error(403, "cross_site_refused", reason)
            reason = self.action_refusal(request)
            if reason is not None:
                return json_error(403, "actions_disabled", reason)
        return await handler(request)

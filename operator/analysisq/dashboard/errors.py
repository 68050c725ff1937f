"""Errors as the browser sees them: a JSON body under ``/api/``, a short page elsewhere.

The outermost middleware: analysisq errors become their status (an unknown run 404, a bad
parameter 400, a database that is down 503) with the error's own message, already free of
credentials; anything else is logged here and answered with a generic 500, never a traceback.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from analysisq.errors import (
    AnalysisqError,
    ConfigError,
    DatabaseUnavailable,
    Deadlock,
    InputError,
    RunNotFound,
    SchemaMismatch,
    SerializationFailure,
    redact,
)

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class BadParameter(InputError):
    """A query parameter or body field the dashboard cannot use."""


class ActionUnavailable(AnalysisqError):
    """This dashboard cannot do that action here (e.g. suspend outside the cluster)."""


_STATUS: list[tuple[type[AnalysisqError], int, str]] = [
    (RunNotFound, 404, "run_not_found"),
    (InputError, 400, "bad_request"),
    (ConfigError, 400, "bad_request"),
    (DatabaseUnavailable, 503, "database_unavailable"),
    # a conflict with another transaction: the same request succeeds when sent again
    (Deadlock, 503, "deadlock"),
    (SerializationFailure, 503, "serialization_failure"),
    (SchemaMismatch, 503, "schema_mismatch"),
    (ActionUnavailable, 409, "action_unavailable"),
]


def json_error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


def _page_error(status: int, message: str) -> web.Response:
    body = (
        "<!doctype html><html lang=en><meta charset=utf-8><title>analysisq dashboard</title>"
        "<link rel=stylesheet href=/static/dashboard.css>"
        f"<main><h1>{status}</h1><p class=error>{html.escape(message)}</p>"
        "<p><a href=/>All runs</a></p></main></html>"
    )
    return web.Response(status=status, text=body, content_type="text/html")


def _answer(request: web.Request, status: int, code: str, message: str) -> web.Response:
    if request.path.startswith("/api/"):
        return json_error(status, code, message)
    return _page_error(status, message)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _answer(request, exc.status, "http_error", exc.reason)
    except AnalysisqError as exc:
        for kind, status, code in _STATUS:
            if isinstance(exc, kind):
                return _answer(request, status, code, redact(exc.message, limit=500))
        log.warning("dashboard request failed: %s", redact(exc.message))
        return _answer(request, 500, "internal_error", redact(exc.message, limit=500))
    except Exception:
        log.exception("dashboard request failed unexpectedly")
        return _answer(request, 500, "internal_error", "internal error; see the server's log")

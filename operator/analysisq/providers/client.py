"""The one HTTP pipeline every provider uses: a shared client and ``post_json``.

``make_http_client`` builds the ``httpx.AsyncClient`` a worker process shares across every
target and item (pooled connections, no transport retries: the queue owns retries).
``post_json`` (and ``send`` for other methods, ``stream_lines`` for result files read line
by line) sends one request with the target's timeouts and translates whatever happens
at the boundary: httpx exceptions become ``TransientError`` (or ``PermanentError`` for a URL
that can never work), non-2xx answers go to ``http_errors.error_for_response``, and a 2xx
body that is not the JSON the provider module expects becomes ``TransientError`` through
``decode_json`` and ``dig``.

Errors are raised outside the ``except`` blocks that caught the httpx exception, so neither
``__cause__`` nor ``__context__`` links to an exception whose request carries our headers.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from analysisq import __version__
from analysisq.errors import PermanentError, ProviderError, TransientError, redact
from analysisq.providers.http_errors import error_for_response, excerpt, exhausted_limit_delay

USER_AGENT = f"analysisq/{__version__}"
#: Connect quickly or not at all: a provider that does not accept a TCP connection within
#: this many seconds is down, whatever the target's (read) timeout.
CONNECT_TIMEOUT_S = 10.0


def make_http_client(
    *,
    max_connections: int = 100,
    max_keepalive_connections: int = 20,
    keepalive_expiry_s: float = 30.0,
    timeout_s: float = 60.0,
    trust_env: bool = True,
    transport: httpx.AsyncBaseTransport | None = None,
) -> httpx.AsyncClient:
    """The client one worker process shares; close it with ``await client.aclose()``.

    *max_connections* bounds concurrent requests of the process (size it to the batch
    size); each request overrides *timeout_s* with its target's ``timeoutSeconds``.
    *trust_env* honours ``HTTPS_PROXY``/``NO_PROXY`` and ``SSL_CERT_FILE``.
    """
    return httpx.AsyncClient(
        limits=httpx.Limits(
            max_connections=max_connections,
            max_keepalive_connections=max_keepalive_connections,
            keepalive_expiry=keepalive_expiry_s,
        ),
        timeout=request_timeout(timeout_s),
        transport=transport or httpx.AsyncHTTPTransport(retries=0, trust_env=trust_env),
        follow_redirects=False,
        trust_env=trust_env,
        headers={"User-Agent": USER_AGENT},
    )


def request_timeout(timeout_s: float) -> httpx.Timeout:
    """Per-phase timeouts for a target whose whole request may take *timeout_s* seconds."""
    return httpx.Timeout(
        timeout_s, connect=min(CONNECT_TIMEOUT_S, timeout_s), read=timeout_s, write=timeout_s
    )


@dataclass(frozen=True)
class Reply:
    """A 2xx answer: its body and how long the exchange took."""

    text: str
    latency_ms: float
    #: ``host[:port]/path`` of the request, for error messages (never the query string).
    where: str
    #: Values to mask should the body reach an error message.
    secrets: tuple[str, ...] = field(default=(), repr=False)
    #: Seconds until a rate limit the provider reports as exhausted resets (its headers).
    limit_reset_s: float | None = None


async def post_json(
    client: httpx.AsyncClient,
    url: str,
    payload: Mapping[str, Any],
    *,
    headers: Mapping[str, str],
    timeout_s: float,
    secrets: Iterable[str] = (),
) -> Reply:
    """POST *payload* as JSON; the 2xx reply, or a ``ProviderError`` saying what went wrong.

    *timeout_s* bounds the whole exchange (a server that trickles bytes cannot hold a worker
    past it); *secrets* are masked in any body excerpt that reaches an error message.
    """
    return await send(
        client, "POST", url, headers=headers, timeout_s=timeout_s, secrets=secrets, json=payload
    )


async def send(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    headers: Mapping[str, str],
    timeout_s: float,
    secrets: Iterable[str] = (),
    **content: Any,
) -> Reply:
    """Send one request (*content*: httpx's ``json``, ``files``, ``data``, ``params``) and
    translate the outcome as ``post_json`` does; the Batch API clients use it for GETs and
    multipart uploads."""
    secrets = tuple(s for s in secrets if s)
    failure: ProviderError
    try:
        request = client.build_request(
            method,
            url,
            headers={"User-Agent": USER_AGENT, **headers},
            timeout=request_timeout(timeout_s),
            **content,
        )
    except httpx.InvalidURL as exc:
        failure = PermanentError(f"invalid provider URL: {redact(str(exc), 200)}")
    else:
        where = _where(request.url)
        started = time.perf_counter()
        try:
            async with asyncio.timeout(timeout_s):
                response = await client.send(request)
        except (TimeoutError, httpx.TimeoutException) as exc:
            phase = type(exc).__name__ if isinstance(exc, httpx.TimeoutException) else "deadline"
            failure = TransientError(f"no answer from {where} within {timeout_s:g}s ({phase})")
        except httpx.UnsupportedProtocol as exc:
            failure = PermanentError(f"cannot {method} {where}: {redact(str(exc), 200)}")
        except httpx.HTTPError as exc:
            # Connection refused/reset, protocol errors, bad content encoding: all may pass.
            detail = redact(str(exc), 200) or "(no detail)"
            failure = TransientError(f"{type(exc).__name__} talking to {where}: {detail}")
        else:
            latency_ms = (time.perf_counter() - started) * 1000
            if response.is_success:
                reset = exhausted_limit_delay(response.headers)
                return Reply(response.text, latency_ms, where, secrets, reset)
            failure = error_for_response(
                response.status_code, response.headers, response.text, where=where, secrets=secrets
            )
    raise failure


async def stream_lines(
    client: httpx.AsyncClient,
    url: str,
    *,
    headers: Mapping[str, str],
    timeout_s: float,
    secrets: Iterable[str] = (),
) -> AsyncIterator[str]:
    """GET *url* and yield its body line by line without holding it whole (a batch result
    file of 50,000 lines stays a few kilobytes in memory). *timeout_s* bounds each read, not
    the whole download; errors are translated as in ``send``."""
    secrets = tuple(s for s in secrets if s)
    failure: ProviderError | None = None
    request = client.build_request(
        "GET",
        url,
        headers={"User-Agent": USER_AGENT, **headers},
        timeout=request_timeout(timeout_s),
    )
    where = _where(request.url)
    try:
        response = await client.send(request, stream=True)
    except httpx.TimeoutException as exc:
        failure = TransientError(
            f"no answer from {where} within {timeout_s:g}s ({type(exc).__name__})"
        )
    except httpx.HTTPError as exc:
        failure = TransientError(
            f"{type(exc).__name__} talking to {where}: {redact(str(exc), 200)}"
        )
    if failure is not None:
        raise failure
    try:
        if not response.is_success:
            text = (await response.aread()).decode("utf-8", "replace")
            failure = error_for_response(
                response.status_code, response.headers, text, where=where, secrets=secrets
            )
        else:
            try:
                async for line in response.aiter_lines():
                    yield line
            except httpx.HTTPError as exc:
                detail = redact(str(exc), 200) or "(no detail)"
                failure = TransientError(f"{type(exc).__name__} reading {where}: {detail}")
    finally:
        await response.aclose()
    if failure is not None:
        raise failure


def decode_json(reply: Reply) -> Any:
    """The reply's body as JSON; a garbled body is the provider's fault and may pass."""
    try:
        return json.loads(reply.text)
    except ValueError:
        pass  # raised below, so that no JSONDecodeError (holding the body) is chained
    body = excerpt(reply.text, reply.secrets, limit=120)
    raise TransientError(f"malformed JSON from {reply.where}: {body!r}")


def dig(reply: Reply, value: Any, *path: str | int, expect: type[Any] = object) -> Any:
    """``value[path[0]][path[1]]...`` of type *expect*, or ``TransientError`` naming it."""
    try:
        for step in path:
            value = value[step]
    except (KeyError, IndexError, TypeError):
        value = None
    if not isinstance(value, expect) or value is None:
        dotted = ".".join(str(p) for p in path) or "JSON object body"
        raise TransientError(f"reply from {reply.where} has no valid {dotted}")
    return value


def optional_int(value: Any) -> int | None:
    """A token count from a provider's usage block, if it is one."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def with_path(endpoint: str, suffix: str) -> str:
    """*endpoint* with *suffix* appended to its path unless it ends with it already; the
    query string stays (e.g. Azure's ``api-version``)."""
    url = httpx.URL(endpoint)
    path = url.path.rstrip("/")
    return str(url.copy_with(path=path if path.endswith(suffix) else path + suffix))


def _where(url: httpx.URL) -> str:
    host = f"{url.host}:{url.port}" if url.port else url.host
    return f"{host}{url.path}"

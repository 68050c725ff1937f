"""Translate a provider's non-2xx answer into the error tree, and read how long to wait.

``client.post_json`` calls ``error_for_response`` for every status outside 2xx. The mapping
(the queue's retry policy depends on it):

- 429 → ``RateLimited`` with the delay the provider asked for (an exhausted quota, OpenAI's
  ``insufficient_quota``, is an ``AuthError`` instead: no retry helps until someone pays);
- 401, 403 → ``AuthError`` (the target is paused for the run);
- 408, 409, 425 and every 5xx (Anthropic's 529 "overloaded" included) → ``TransientError``;
- 413, and 400/422 whose body says the prompt is too long or was refused as content →
  ``InvalidInput``;
- 404 and 405 (a wrong endpoint path, or a model or deployment that does not exist), and
  400/422 whose body blames the model (``model_not_found``, ``param: model``, "Invalid model
  name") → ``TargetFault``: every prompt of the target would get the same answer, so the
  queue's circuit breaker pauses the target once it has seen a few in a row;
- anything else → ``PermanentError``.

Messages carry the status, where the request went (host and path only) and a bounded excerpt
of the body with the API key and anything credential-like masked.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import httpx

from analysisq.errors import (
    AuthError,
    InvalidInput,
    PermanentError,
    ProviderError,
    RateLimited,
    TargetFault,
    TransientError,
    redact,
)

#: Longest wait we accept from a provider's headers; a larger value is a provider bug, and
#: the queue still bounds how often an item may be deferred.
MAX_RETRY_AFTER_S = 3600.0

_TRANSIENT_STATUSES = frozenset({408, 409, 425})
_INVALID_INPUT_CODES = frozenset(
    {
        "context_length_exceeded",
        "string_above_max_length",
        "content_policy_violation",
        "content_filter",
        "invalid_prompt",
        "request_too_large",
    }
)
# Context-window wording of OpenAI, Anthropic, vLLM, Ollama and LiteLLM, and content refusals.
_INVALID_INPUT_TEXT = re.compile(
    r"(?i)maximum context length|context[_ ]length|context window|prompt is too long|"
    r"input is too long|too many (input )?tokens|reduce the length|content[_ ]policy|"
    r"content[_ ]filter|safety system"
)
_MODEL_CODES = frozenset(
    {
        "model_not_found",
        "invalid_model",
        "unknown_model",
        "model_not_available",
        "DeploymentNotFound",
        "unsupported_model",
    }
)
# "Invalid model name passed in model=..." (LiteLLM), "The model `x` does not exist" (OpenAI,
# vLLM), "model 'x' not found" (Ollama), "model: claude-x" (Anthropic's 404). Bounded gaps
# keep the scan linear.
_MODEL_TEXT = re.compile(
    r"(?i)^\s*model:\s|\b(?:invalid|unknown|unsupported|nonexistent|no such)\s+model\b|"
    r"\bmodel\b[^.\n]{0,120}?\b(?:does not exist|not found|is not supported|is invalid)\b"
)
#: Bodies are matched on their first characters only (a 32 KB error page needs no more).
_SCAN_CHARS = 4000
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def error_for_response(
    status: int,
    headers: Mapping[str, str],
    text: str,
    *,
    where: str,
    secrets: Iterable[str] = (),
) -> ProviderError:
    """The ``ProviderError`` that an HTTP *status* with body *text* from *where* means."""
    codes, label, detail, param = _error_detail(text, status)
    message = f"HTTP {status} from {where}: {label + ': ' if label else ''}"
    message += excerpt(_unrepeated(detail or text, status), secrets) or "(empty body)"
    scanned = (detail or text)[:_SCAN_CHARS]
    if status == 429:
        if "insufficient_quota" in codes:
            return AuthError(message, status=status)
        return RateLimited(message, status=status, delay=retry_delay(headers))
    if status in (401, 403):
        return AuthError(message, status=status)
    if status in _TRANSIENT_STATUSES or status >= 500:
        return TransientError(message, status=status, delay=retry_delay(headers))
    if status == 413 or (
        status in (400, 422)
        and (codes & _INVALID_INPUT_CODES or _INVALID_INPUT_TEXT.search(scanned))
    ):
        return InvalidInput(message, status=status)
    blames_model = bool(codes & _MODEL_CODES or param == "model" or _MODEL_TEXT.search(scanned))
    if status in (404, 405) or (status in (400, 422) and blames_model):
        fault = f"HTTP {status} {label}".strip()
        setting = "model" if blames_model else "endpoint"
        return TargetFault(message, status=status, fault=fault, setting=setting)
    return PermanentError(message, status=status)


def excerpt(text: str, secrets: Iterable[str] = (), limit: int = 300) -> str:
    """*text* on one line, bounded, with each of *secrets* and anything key-like masked."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return redact(" ".join(text.split()), limit)


def retry_delay(headers: Mapping[str, str], *, now: datetime | None = None) -> float | None:
    """Seconds the provider asked us to wait, or ``None`` if it did not say.

    Read in order: ``retry-after-ms`` (OpenAI, Azure), ``Retry-After`` in seconds or as an
    HTTP date, then the reset time of an exhausted ``x-ratelimit-*`` (OpenAI: durations like
    ``6m0s``) or ``anthropic-ratelimit-*`` (RFC 3339 timestamps) limit.
    """
    h = httpx.Headers(headers)
    now = now or datetime.now(UTC)
    millis = _number(h.get("retry-after-ms"))
    if millis is not None:
        return _clamp(millis / 1000)
    value = h.get("retry-after")
    if value:
        seconds = _number(value)
        if seconds is None:
            when = _http_date(value)
            seconds = None if when is None else (when - now).total_seconds()
        if seconds is not None:
            return _clamp(seconds)
    return exhausted_limit_delay(h, now=now)


def exhausted_limit_delay(
    headers: Mapping[str, str], *, now: datetime | None = None
) -> float | None:
    """Seconds until the provider's exhausted rate limit resets, from its ``x-ratelimit-*``
    or ``anthropic-ratelimit-*`` headers; ``None`` when no limit it reports is at zero.

    Successful answers carry these headers too: a reply saying ``remaining: 0`` means the
    next request would get a 429, so the rate pool waits for the reset instead.
    """
    h = httpx.Headers(headers)
    now = now or datetime.now(UTC)
    waits: list[float] = []
    for kind in ("requests", "tokens"):
        if h.get(f"x-ratelimit-remaining-{kind}") == "0":
            wait = _duration(h.get(f"x-ratelimit-reset-{kind}", ""))
            if wait is not None:
                waits.append(wait)
    for kind in ("requests", "tokens", "input-tokens", "output-tokens"):
        if h.get(f"anthropic-ratelimit-{kind}-remaining") == "0":
            when = _iso_date(h.get(f"anthropic-ratelimit-{kind}-reset", ""))
            if when is not None:
                waits.append((when - now).total_seconds())
    return _clamp(max(waits)) if waits else None


def _unrepeated(text: str, status: int) -> str:
    """*text* without the leading ``404:`` of a framework's plain error page ("404: Not
    Found"): the message says the status already. Other text is the provider's own."""
    rest = re.sub(rf"^\s*{status}:\s*", "", text)
    return rest or text


def _error_detail(text: str, status: int) -> tuple[frozenset[str], str, str, str]:
    """The error code and type, a label (the code, else the type; never the *status*, which
    the message says already: LiteLLM's ``"code": "400"``), the message and the parameter
    blamed (OpenAI's ``param``) of an error body, if it is JSON.

    Shapes: OpenAI ``{"error": {"message", "type", "code"}}``, Anthropic
    ``{"type": "error", "error": {"type", "message"}}``, vLLM ``{"object": "error",
    "message", "type"}``, Ollama ``{"error": "text"}``.
    """
    try:
        body = json.loads(text)
    except ValueError:
        return frozenset(), "", "", ""
    error = body.get("error", body) if isinstance(body, dict) else None
    if isinstance(error, str):
        return frozenset(), "", error, ""
    if not isinstance(error, dict):
        return frozenset(), "", "", ""
    named = [str(error[k]) for k in ("code", "type") if isinstance(error.get(k), str)]
    labels = [n for n in named if n != str(status)]
    message = error.get("message")
    param = error.get("param")
    return (
        frozenset(named),
        labels[0] if labels else "",
        message if isinstance(message, str) else "",
        param if isinstance(param, str) else "",
    )


def _number(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _clamp(seconds: float) -> float:
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def _http_date(value: str) -> datetime | None:
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _iso_date(value: str) -> datetime | None:
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _duration(value: str) -> float | None:
    """OpenAI's reset durations: ``12ms``, ``1s``, ``6m0s``, ``1h2m3.5s``."""
    parts = _DURATION.findall(value)
    if not parts or "".join(n + u for n, u in parts) != value:
        return None
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    return sum(float(n) * scale[u] for n, u in parts)

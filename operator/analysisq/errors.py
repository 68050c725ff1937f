"""The one exception tree of analysisq.

Every error that crosses a module boundary is one of these. Lower-level errors (asyncpg,
httpx, the Kubernetes client) are translated where they are caught, so callers decide what to
do from the type alone: a ``TransientError`` is retried with backoff, a ``PermanentError``
fails the item at once (a ``TargetFault`` too, but the same one several times in a row pauses
the target: the queue's circuit breaker), an ``AuthError`` pauses the target for the run, a
``RateLimited`` reschedules without burning an attempt. Each class docstring is its default message.
On the operator's side the meaning is in two class attributes: ``reason`` (what a run reports
the error as) and ``retryable`` (the operator tries again: a database, a Secret or the
Kubernetes API that may come back; ``NotYet``, a change under way).

Messages never contain secrets: provider errors carry the status code and a bounded excerpt
of the body with anything that looks like a credential removed (see ``redact``).
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import ClassVar


class ErrorClass(StrEnum):
    """Why an item failed; stored in ``analysis_queue.error_class``."""

    TRANSIENT = "transient"
    RATE_LIMITED = "rate_limited"
    PERMANENT = "permanent"
    AUTH = "auth"
    INVALID_INPUT = "invalid_input"
    POISON = "poison"
    LEASE_LOST = "lease_lost"


class AnalysisqError(Exception):
    """analysisq failed."""

    #: The reason a run reports this error under (its ``Degraded`` condition, Event and
    #: metric label).
    reason: ClassVar[str] = "Error"
    #: The cause is outside analysisq and may go away (a database, a Secret, the Kubernetes
    #: API): the operator reports it and tries again. Otherwise the error is bad input or a
    #: bug, and retrying will not help.
    retryable: ClassVar[bool] = False

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())

    @property
    def message(self) -> str:
        return str(self.args[0])


class ConfigError(AnalysisqError):
    """The configuration is invalid."""


class SpecError(ConfigError):
    """The AnalysisRun spec is invalid."""

    reason = "InvalidSpec"


class InputError(AnalysisqError):
    """The input file has invalid rows."""


class DatabaseError(AnalysisqError):
    """The database failed."""

    reason = "DatabaseError"
    retryable = True


class DatabaseTransient(DatabaseError):
    """The database did not do it this time; the same statement succeeds when run again.

    Callers that retry catch this (an outage or a conflict alike); what to report is in the
    subclass: its ``reason`` and its message, which names the statement."""

    reason = "DatabaseTransient"


class DatabaseUnavailable(DatabaseTransient):
    """The database cannot be reached."""

    reason = "DatabaseUnavailable"


class Deadlock(DatabaseTransient):
    """PostgreSQL aborted this transaction to break a lock cycle with another (40P01); it
    is retried. The database is up: this is no outage."""

    reason = "Deadlock"


class SerializationFailure(DatabaseTransient):
    """PostgreSQL aborted this transaction because it conflicted with a concurrent one
    (40001); it is retried. The database is up: this is no outage."""

    reason = "SerializationFailure"


class SchemaMismatch(DatabaseError):
    """The database schema is not the one this analysisq knows; run `analysisq migrate`."""

    reason = "SchemaMismatch"


class KubeApiError(AnalysisqError):
    """The Kubernetes API failed; the operator retries."""

    reason = "KubernetesApiError"
    retryable = True

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        #: The HTTP status of the API's answer; None when the API was not reached.
        self.status = status


class SecretMissing(AnalysisqError):
    """A Secret (or a key in it) that the run references does not exist."""

    reason = "SecretMissing"
    retryable = True


class NotYet(AnalysisqError):
    """A change is under way (e.g. a rollout); the operator tries again in a moment."""

    reason = "NotYet"
    retryable = True


class RunNotFound(AnalysisqError):
    """No such run."""


class BatchesOpen(AnalysisqError):
    """The run still has open provider batches: deleting its rows now would leave them running,
    paid, with nobody to ingest them; cancel them first (``queue.batches.cancel_open``)."""

    reason = "BatchesOpen"
    retryable = True


class BudgetExhausted(AnalysisqError):
    """The run's budget cannot cover the next request: the run is paused (BudgetExhausted);
    raise the budget to continue."""


class ProviderError(AnalysisqError):
    """The provider failed."""

    error_class: ErrorClass = ErrorClass.PERMANENT

    def __init__(self, message: str | None = None, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class TransientError(ProviderError):
    """The provider failed in a way that may succeed on retry."""

    error_class = ErrorClass.TRANSIENT

    def __init__(
        self, message: str | None = None, *, status: int | None = None, delay: float | None = None
    ) -> None:
        super().__init__(message, status=status)
        #: Seconds the provider asked us to wait (``Retry-After``), if it said.
        self.delay = delay


class RateLimited(TransientError):
    """The provider is rate limiting us (HTTP 429)."""

    error_class = ErrorClass.RATE_LIMITED


class PermanentError(ProviderError):
    """The provider refused this request; retrying will not help."""

    error_class = ErrorClass.PERMANENT


class TargetFault(PermanentError):
    """The provider refused the target itself (a misspelt model, a wrong endpoint path)."""

    error_class = ErrorClass.PERMANENT

    def __init__(
        self, message: str | None = None, *, status: int | None = None, fault: str, setting: str
    ) -> None:
        super().__init__(message, status=status)
        #: What makes two answers the same fault: the status and the error code, never the
        #: message (which may carry a request id).
        self.fault = fault
        #: The target's setting that is wrong: ``model`` or ``endpoint``.
        self.setting = setting


class InvalidInput(PermanentError):
    """The prompt cannot be sent (empty, too long, or refused as content)."""

    error_class = ErrorClass.INVALID_INPUT


class AuthError(ProviderError):
    """The provider refused our credentials (HTTP 401/403); the target is paused for the run."""

    error_class = ErrorClass.AUTH


# Linear on any input: a URL scheme starts only where a run of scheme characters starts
# (a lookbehind, not \b, which let "a.a.a.a..." restart the scan at every letter).
_SECRETISH = re.compile(
    r"(?i)(bearer\s+[A-Za-z0-9._~+/=-]+|sk-[A-Za-z0-9_-]{6,}|"
    r"(api[_-]?key|x-api-key|authorization|password|token)(\"?\s*[:=]\s*\"?)[^\s\",}]+|"
    r"(?<![a-z0-9+.-])[a-z][a-z0-9+.-]*://[^\s/]*@)"
)
#: Redaction looks this far past the limit, so that a credential the cut goes through is
#: still recognised and masked.
_REDACT_MARGIN = 256


def redact(text: str, limit: int = 300) -> str:
    """Return *text* cut to *limit* characters with anything credential-like masked.

    Cut first, then redact: the work is bounded by *limit*, whatever the size of *text* (a
    provider's 32 KB error page must not hold the event loop)."""

    def mask(m: re.Match[str]) -> str:
        s = m.group(0)
        if "://" in s and s.endswith("@"):
            return s.split("://", 1)[0] + "://***@"
        if m.group(2):
            return f"{m.group(2)}{m.group(3)}***"
        return "***"

    head = text[: limit + _REDACT_MARGIN]
    # PostgreSQL text cannot hold NUL; a provider's message may contain one.
    cleaned = _SECRETISH.sub(mask, head.replace("\x00", "\ufffd"))
    if len(cleaned) <= limit and len(head) == len(text):
        return cleaned
    return cleaned[: limit - 1] + "…"

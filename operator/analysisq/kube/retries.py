"""Bulk retry on a live AnalysisRun: the ``analysisq.io/retry-failed`` annotation.

``kubectl annotate analysisrun/NAME analysisq.io/retry-failed=class=permanent --overwrite``
asks the operator to put the run's failed-for-good items back in the queue, as
``analysisq retry`` does. The value is a filter, ``all`` (or empty) or comma-separated
``class=C``, ``target=T``, ``error=TEXT`` (TEXT without commas); the operator removes the
annotation once it acted, so the same command works again. A finished run that gets items
back runs again: ``reopened`` is its status (phase Running, workers scaled up, ``Complete``
False until the items are terminal again). ``service.RunService.retry_failed`` applies it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from analysisq.errors import ConfigError, ErrorClass
from analysisq.kube.ref import GROUP
from analysisq.kube.status import COMPLETE, RUNNING, SUSPENDED, set_condition, timestamp
from analysisq.spec import AnalysisRunSpec

RETRY_ANNOTATION = f"{GROUP}/retry-failed"
_KEYS = ("class", "target", "error")


@dataclass(frozen=True)
class RetryRequest:
    """Which failed items to put back; None = any."""

    error_class: str | None = None
    target: str | None = None
    error: str | None = None

    def describe(self) -> str:
        parts = [f"{k}={v}" for k, v in zip(_KEYS, vars(self).values(), strict=True) if v]
        return ", ".join(parts) or "all"


def parse_retry_request(value: str, spec: AnalysisRunSpec) -> RetryRequest:
    """The filter an annotation value asks for, or ``ConfigError`` saying what is wrong."""
    text = value.strip()
    if text in ("", "all"):
        return RetryRequest()
    found: dict[str, str] = {}
    for part in text.split(","):
        key, sep, val = part.partition("=")
        key, val = key.strip(), val.strip()
        if not sep or key not in _KEYS or not val:
            raise ConfigError(
                f"{part.strip()!r} is not one of class=C, target=T, error=TEXT (or 'all')"
            )
        if key in found:
            raise ConfigError(f"{key} is given twice")
        found[key] = val
    cls = found.get("class")
    if cls is not None and cls not in set(ErrorClass):
        raise ConfigError(f"unknown class {cls!r}; one of: {', '.join(ErrorClass)}")
    if "target" in found:
        spec.target(found["target"])  # SpecError (a ConfigError) names the targets
    return RetryRequest(cls, found.get("target"), found.get("error"))


def reopened(
    status: Mapping[str, Any], spec: AnalysisRunSpec, count: int, replicas: int
) -> dict[str, Any]:
    """The status of a finished run that got *count* items back: running again."""
    conditions = set_condition(
        status.get("conditions") or [],
        COMPLETE,
        False,
        "ItemsRetried",
        f"{count} failed items were put back in the queue",
    )
    workers = dict(status.get("workers") or {}, desired=replicas)
    return {
        "phase": SUSPENDED if spec.suspend else RUNNING,
        "finishedAt": None,
        "conditions": conditions,
        "workers": workers,
    }


def last_retry(request: RetryRequest, count: int) -> dict[str, Any]:
    """``status.lastRetry``: when, which filter, how many items came back."""
    return {"time": timestamp(), "filter": request.describe()[:4096], "count": count}

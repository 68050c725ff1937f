"""What happens to a claimed item that got no result: the ``Decision`` types and ``apply``.

``retry.RetryPolicy`` turns a provider error into a decision; the worker adds ``Release``
(shutdown, a database error before any answer). ``apply(conn, item, decision)`` is the one
call by which a decision reaches the database: each kind becomes one fenced write of
``items`` (a pause also pauses the target, a deferral after ``Retry-After`` also holds back
the target's shared limiter). The worker matches on the same union with ``assert_never``, so
a new kind of decision cannot be forgotten on either side.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import ClassVar, assert_never

import asyncpg

from analysisq.errors import ErrorClass, TargetFault
from analysisq.queue import items, ratelimit, runs
from analysisq.queue.items import ClaimedItem


class Action(StrEnum):
    """The name of each kind of decision, for logs and tests."""

    RETRY = "retry"  # failed, will be retried after `delay`
    FAIL = "fail"  # failed for good
    DEFER = "defer"  # back to pending after `delay`, attempt not counted
    PAUSE = "pause"  # pause the target for the run; item parked, not counted
    RELEASE = "release"  # back to pending now, attempt not counted


@dataclass(frozen=True)
class Retry:
    """Failed this attempt; claimable again after ``delay`` seconds while attempts remain."""

    action: ClassVar[Action] = Action.RETRY
    error_class: ErrorClass
    message: str
    delay: float


@dataclass(frozen=True)
class Fail:
    """Failed for good, with the reason stored."""

    action: ClassVar[Action] = Action.FAIL
    delay: ClassVar[None] = None
    error_class: ErrorClass
    message: str
    #: The provider refused the target, not the item: the circuit breaker counts it.
    fault: TargetFault | None = None


@dataclass(frozen=True)
class Defer:
    """Back to pending after ``delay`` without spending an attempt (a 429); counts a deferral."""

    action: ClassVar[Action] = Action.DEFER
    error_class: ErrorClass
    message: str
    delay: float
    #: The provider's ``Retry-After``: no worker sends to the target before it has passed.
    retry_after: float | None = None


@dataclass(frozen=True)
class Pause:
    """The target refused our credentials: pause it for the run and park the item."""

    action: ClassVar[Action] = Action.PAUSE
    delay: ClassVar[None] = None
    error_class: ErrorClass
    message: str


@dataclass(frozen=True)
class Release:
    """Give the item back unspent (shutdown, the database failed before any answer, its
    target was paused while the claim waited: ``park`` then parks it like ``Pause``)."""

    action: ClassVar[Action] = Action.RELEASE
    delay: ClassVar[None] = None
    message: str | None = None
    park: bool = False


Decision = Retry | Fail | Defer | Pause | Release


@dataclass(frozen=True)
class Applied:
    """What ``apply`` did: ``written`` is False when the claim was no longer ours."""

    written: bool
    #: This call paused the target (the first of the run's items to meet the fault).
    paused_target: bool = False


async def apply(conn: asyncpg.Connection, item: ClaimedItem, decision: Decision) -> Applied:
    """Write *decision* for *item*'s claim (fenced by its token)."""
    match decision:
        case Retry(error_class=cls, message=msg, delay=delay):
            return Applied(await items.fail(conn, item, cls, msg, delay))
        case Fail(error_class=cls, message=msg, fault=fault):
            return Applied(await items.fail(conn, item, cls, msg, None, fault=fault))
        case Defer(error_class=cls, message=msg, delay=delay, retry_after=after):
            if after:
                await ratelimit.backoff(conn, item.run_id, item.target, after)
            ok = await items.release(
                conn, item, delay=delay, deferral=True, error_class=cls, message=msg
            )
            return Applied(ok)
        case Pause(error_class=cls, message=msg):
            paused = await runs.pause_target(conn, item.run_id, item.target, msg)
            ok = await items.release(conn, item, error_class=cls, message=msg, park=True)
            return Applied(ok, paused_target=paused)
        case Release(message=msg, park=park):
            return Applied(await items.release(conn, item, message=msg, park=park))
        case _:
            assert_never(decision)

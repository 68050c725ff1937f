"""The retry policy: what each error class means for an item."""

from __future__ import annotations

import random

import pytest

from analysisq.errors import (
    AuthError,
    ErrorClass,
    InvalidInput,
    PermanentError,
    RateLimited,
    TransientError,
)
from analysisq.queue.retry import Action, RetryPolicy

pytestmark = pytest.mark.unit

P = RetryPolicy(base_seconds=2, cap_seconds=30, max_deferrals=3, rate_limited_seconds=5)


def decide(err: Exception, attempt: int = 1, deferrals: int = 0, max_attempts: int = 3):  # type: ignore[no-untyped-def]
    return P.decide(
        err,  # type: ignore[arg-type]
        attempt=attempt,
        max_attempts=max_attempts,
        deferrals=deferrals,
        rng=random.Random(1),
    )


def test_full_jitter_backoff_grows_and_is_capped() -> None:
    rng = random.Random(42)
    for attempt, ceiling in [(1, 2), (2, 4), (3, 8), (4, 16), (5, 30), (10, 30)]:
        draws = [P.backoff(attempt, rng) for _ in range(500)]
        assert min(draws) >= 0 and max(draws) <= ceiling
        assert max(draws) > ceiling * 0.9  # the whole range is used (full jitter)


def test_transient_retries_until_the_last_attempt() -> None:
    d = decide(TransientError("503 from provider", status=503), attempt=1)
    assert d.action is Action.RETRY and d.error_class is ErrorClass.TRANSIENT
    assert d.delay is not None and 0 <= d.delay <= 2
    last = decide(TransientError("503"), attempt=3)
    assert last.action is Action.FAIL and "gave up after 3 attempts" in last.message


def test_retry_after_is_a_floor_for_transient_errors() -> None:
    d = decide(TransientError("503", delay=20.0), attempt=1)
    assert d.action is Action.RETRY and d.delay == 20.0


def test_429_defers_without_an_attempt_but_only_so_often() -> None:
    d = decide(RateLimited("429", status=429, delay=7.0), deferrals=0)
    assert d.action is Action.DEFER and 7.0 <= (d.delay or 0) <= 8.0
    no_header = decide(RateLimited("429", status=429), deferrals=2)
    assert no_header.action is Action.DEFER and 5.0 <= (no_header.delay or 0) <= 6.0
    worn_out = decide(RateLimited("429", status=429, delay=1.0), deferrals=3, attempt=1)
    assert worn_out.action is Action.RETRY and worn_out.error_class is ErrorClass.RATE_LIMITED
    final = decide(RateLimited("429", status=429), deferrals=3, attempt=3)
    assert final.action is Action.FAIL


@pytest.mark.parametrize(
    ("err", "cls"),
    [
        (PermanentError("400 bad request", status=400), ErrorClass.PERMANENT),
        (InvalidInput("prompt too long"), ErrorClass.INVALID_INPUT),
    ],
)
def test_permanent_errors_fail_at_once(err: Exception, cls: ErrorClass) -> None:
    d = decide(err, attempt=1)
    assert (d.action, d.error_class, d.delay) == (Action.FAIL, cls, None)


def test_auth_pauses_the_target() -> None:
    d = decide(AuthError("401 invalid api key", status=401), attempt=1)
    assert (d.action, d.error_class) == (Action.PAUSE, ErrorClass.AUTH)

"""What an error means for an item: retry, fail for good, defer, or pause the target.

Pure policy, no I/O: ``RetryPolicy.decide`` returns one of the ``decisions`` types, which
``decisions.apply`` writes. Transient errors (timeouts, connection errors, 5xx, malformed
bodies) retry with exponential backoff and full jitter, never sooner than the provider's
Retry-After; a 429 defers the item without burning an attempt, at most ``max_deferrals`` times
so that it cannot be deferred forever; permanent errors fail at once; an auth failure pauses
the target. A ``TargetFault`` fails the item like any permanent error and rides along in the
``Fail``, so that the queue's circuit breaker (``breaker``) can pause the target when it
repeats.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from analysisq.errors import (
    AuthError,
    ErrorClass,
    ProviderError,
    RateLimited,
    TargetFault,
    TransientError,
)
from analysisq.queue.decisions import Action, Defer, Fail, Pause, Retry

__all__ = ["Action", "PolicyDecision", "RetryPolicy"]

#: What the policy can decide (``Release`` is the worker's own, never the policy's).
PolicyDecision = Retry | Fail | Defer | Pause


@dataclass(frozen=True)
class RetryPolicy:
    #: First retry waits up to this many seconds; each retry doubles it (full jitter).
    base_seconds: float = 2.0
    #: No backoff is longer than this.
    cap_seconds: float = 300.0
    #: 429s an item may take without burning an attempt; past this a 429 counts as transient.
    max_deferrals: int = 20
    #: Delay after a 429 that did not say Retry-After.
    rate_limited_seconds: float = 5.0

    def backoff(self, attempt: int, rng: random.Random) -> float:
        """Full jitter: uniform in [0, min(cap, base * 2^(attempt-1))]."""
        ceiling = min(self.cap_seconds, self.base_seconds * 2 ** max(attempt - 1, 0))
        return rng.uniform(0, ceiling)

    def decide(
        self,
        error: ProviderError,
        *,
        attempt: int,
        max_attempts: int,
        deferrals: int,
        rng: random.Random,
    ) -> PolicyDecision:
        message = error.message
        if isinstance(error, AuthError):
            return Pause(ErrorClass.AUTH, message)
        if isinstance(error, RateLimited) and deferrals < self.max_deferrals:
            delay = error.delay if error.delay is not None else self.rate_limited_seconds
            # a little jitter so deferred items do not return in one burst
            return Defer(ErrorClass.RATE_LIMITED, message, delay + rng.uniform(0, 1), error.delay)
        if isinstance(error, TransientError):
            if attempt >= max_attempts:
                return Fail(error.error_class, f"gave up after {attempt} attempts: {message}")
            delay = max(self.backoff(attempt, rng), error.delay or 0.0)
            return Retry(error.error_class, message, delay)
        fault = error if isinstance(error, TargetFault) else None
        return Fail(error.error_class, message, fault=fault)

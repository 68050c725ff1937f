"""The operator's timers: a tick that raised comes back at the timer's own interval.

kopf retries a handler that raised an unexpected exception after ``default_backoff`` (60 s),
so without a backoff of its own one failed reconcile froze the resource's status for a
minute (a budget-paused run showed a stale cost in CI).
"""

from __future__ import annotations

from typing import Any, cast

import kopf

from analysisq.kube import handlers
from analysisq.kube.service import RunService
from analysisq.settings import Settings


def timers(settings: Settings) -> dict[str, Any]:
    registry = kopf.OperatorRegistry()
    # Registering only decorates; the service is not called until a handler runs.
    handlers.register(registry, cast(RunService, object()), settings)
    return {
        str(h.id): h
        for h in registry._spawning.get_all_handlers()
        if getattr(h, "interval", None) is not None  # kopf's TimerHandler is not exported
    }


def test_a_failed_timer_tick_is_retried_at_the_timer_interval() -> None:
    settings = Settings(reconcile_seconds=2.5, stuck_reset_seconds=40)
    found = timers(settings)
    assert set(found) == {"reconcile", "reset-stuck"}
    assert found["reconcile"].backoff == 2.5
    assert found["reset-stuck"].backoff == 40

"""Throughput, one rule for every view: items finished per second over a recent window.

Two ways to measure it, both here:

- in memory, from successive counts of terminal items (``RateMeter``): the operator's status
  and metrics sample once per reconcile, so they look back ``OPERATOR_WINDOW_SECONDS``; the
  local progress display samples twice a second and looks back ``LOCAL_WINDOW_SECONDS``;
- in SQL, items completed within ``THROUGHPUT_WINDOW_SECONDS`` (the runbook's ``status``,
  the dashboard's runs and targets; ``monitor.throughput``, ``queue.dashboard``), for views
  that have no earlier sample to compare with.

Every view reads a number (items per second); only display code formats it.
"""

from __future__ import annotations

import time
from collections import deque

#: What the SQL views count over.
THROUGHPUT_WINDOW_SECONDS = 60.0
#: The operator reconciles every ``reconcile_seconds`` (15 s by default): eight samples.
OPERATOR_WINDOW_SECONDS = 120.0
#: The local display samples every half second.
LOCAL_WINDOW_SECONDS = 15.0
#: A rate over less time than this is noise, not a measurement.
_MIN_SPAN_SECONDS = 1.0


class RateMeter:
    """Items finished per second over a sliding window of (time, terminal count) samples."""

    def __init__(self, window: float) -> None:
        self.window = window
        self._samples: deque[tuple[float, int]] = deque()
        self._rate: float | None = None

    def add(self, terminal: int, at: float | None = None) -> float | None:
        """Record the terminal count now (or *at*); return the rate (``rate``)."""
        now = time.monotonic() if at is None else at
        self._samples.append((now, terminal))
        # Keep one sample older than the window, so the window is always covered.
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window:
            self._samples.popleft()
        first_t, first_n = self._samples[0]
        span = now - first_t
        self._rate = None if span < _MIN_SPAN_SECONDS else max(0.0, (terminal - first_n) / span)
        return self._rate

    @property
    def rate(self) -> float | None:
        """Items per second at the last sample; None until it is measurable."""
        return self._rate

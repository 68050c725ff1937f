"""Throughput: one meter for the operator's status and the local display."""

from __future__ import annotations

import pytest

from analysisq.queue.throughput import RateMeter

pytestmark = pytest.mark.unit


def test_throughput_is_measured_over_a_window() -> None:
    meter = RateMeter(window=60)
    assert meter.add(0, at=0.0) is None
    assert meter.add(50, at=10.0) == 5.0
    assert meter.add(100, at=20.0) == 5.0
    for t in range(30, 200, 10):
        rate = meter.add(100 + (t - 20) * 2, at=float(t))
    assert rate == pytest.approx(2.0)


def test_the_local_display_samples_twice_a_second() -> None:
    meter = RateMeter(window=10)
    assert meter.rate is None
    for t in range(0, 30):
        meter.add(5 * t, at=float(t))
    assert meter.rate == pytest.approx(5.0)

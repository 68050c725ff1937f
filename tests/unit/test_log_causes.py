"""A log line says its cause once: the message says what the process does, ``error`` why."""

from __future__ import annotations

import asyncio
import logging

import pytest

from analysisq.errors import Deadlock
from analysisq.worker.startup import _through_outages

pytestmark = pytest.mark.unit


async def test_a_worker_waiting_for_the_database_names_the_cause_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    failures = [Deadlock("reading run run-1: deadlock, retried: deadlock detected")]

    async def step() -> str:
        if failures:
            raise failures.pop()
        return "run-1"

    with caplog.at_level(logging.WARNING, logger="analysisq"):
        assert await _through_outages(asyncio.Event(), step) == "run-1"
    [record] = caplog.records
    assert record.getMessage() == "worker not started yet; retrying"
    assert record.__dict__["error"] == "reading run run-1: deadlock, retried: deadlock detected"

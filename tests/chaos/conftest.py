"""Fixtures of the chaos tier: worker processes that are always reaped."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from workers import WorkerProcs


@pytest.fixture
def procs_factory() -> Iterator[list[WorkerProcs]]:
    """``WorkerProcs`` a test appends here are killed and reaped after it."""
    made: list[WorkerProcs] = []
    yield made
    for p in made:
        p.close()

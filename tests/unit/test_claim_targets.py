"""Which targets a worker's claims skip and how many places they fill (``ClaimTargets``)."""

from __future__ import annotations

from typing import Any

import pytest

from analysisq.spec import parse_spec
from analysisq.worker.claim_targets import ClaimTargets

pytestmark = pytest.mark.unit

LIMITED = {"name": "slow", "provider": "echo", "model": "m", "rateLimit": {"requestsPerSecond": 1}}
FAST = {"name": "fast", "provider": "echo", "model": "m"}


def targets(*ts: dict[str, Any]) -> ClaimTargets:
    return ClaimTargets("run-1", parse_spec({"targets": list(ts)}), lambda: 0.0, 1.0)


def test_without_limits_every_free_place_is_claimed() -> None:
    assert targets(FAST).places(10, 0) == (10, [])


def test_places_that_start_at_once_take_any_target() -> None:
    assert targets(LIMITED, FAST).places(10, 3) == (3, [])
    assert targets(LIMITED, FAST).places(2, 3) == (2, [])


def test_prefetch_places_skip_the_limited_targets() -> None:
    assert targets(LIMITED, FAST).places(10, 0) == (10, ["slow"])


def test_prefetch_of_only_limited_targets_claims_nothing() -> None:
    assert targets(LIMITED).places(10, 0) == (0, ["slow"])


def test_a_paused_target_is_skipped() -> None:
    t = targets(LIMITED, FAST)
    t.pause("fast")
    assert t.places(5, 5) == (5, ["fast"])
    # Every sync target skipped when prefetching: nothing until an attempt ends.
    assert t.places(5, 0) == (0, ["fast", "slow"])


def test_a_resumed_target_is_claimed_again_after_the_recheck() -> None:
    now = [0.0]
    t = ClaimTargets("run-1", parse_spec({"targets": [FAST]}), lambda: now[0], 1.0)
    t.pause("fast")
    assert t.places(5, 5) == (5, ["fast"])
    assert not t.recheck_due()
    now[0] = 1.0
    assert t.recheck_due()

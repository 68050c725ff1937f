"""Quotas without a database: the one token estimate, the spec's refusals, the Paused status,
and the fake provider's usage and token peaks."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from analysisq.errors import SpecError
from analysisq.fake_provider.config import FakeConfig
from analysisq.fake_provider.server import FakeProvider
from analysisq.fake_provider.stats import Recorder
from analysisq.kube.report import transition_notes
from analysisq.kube.status import Observation, get_condition, reconciled
from analysisq.providers import make_http_client, make_provider
from analysisq.providers.http_errors import exhausted_limit_delay
from analysisq.queue.budget import BudgetState
from analysisq.queue.states import Counts
from analysisq.queue.usage import RunUsage, TargetUsage
from analysisq.spec import Target, parse_spec
from analysisq.tokens import completion_ceiling, estimate

pytestmark = pytest.mark.unit


def target(**kw: Any) -> dict[str, Any]:
    return {"name": "t", "provider": "openai", "model": "m", **kw}


def test_the_estimate_uses_each_providers_own_completion_ceiling() -> None:
    prompt = "x" * 400  # 100 prompt tokens
    anthropic = Target.model_validate(target(provider="anthropic"))
    assert estimate(anthropic, prompt).total == 100 + 1024  # the API's max_tokens we send
    assert estimate(Target.model_validate(target()), prompt).total == 100 + 256
    capped = Target.model_validate(target(params={"max_completion_tokens": 50}))
    assert completion_ceiling(capped) == 50
    assert completion_ceiling(Target.model_validate(target(params={"max_tokens": True}))) == 256


@pytest.mark.parametrize(
    ("changes", "where"),
    [
        ({"pricing": {"inputPerMillionTokens": -1, "outputPerMillionTokens": 1}},
         "targets.0.pricing.inputPerMillionTokens"),
        ({"pricing": {"inputPerMillionTokens": "abc", "outputPerMillionTokens": 1}},
         "targets.0.pricing.inputPerMillionTokens"),
        ({"pricing": {"inputPerMillionTokens": 1, "outputPerMillionTokens": "2.5"}},
         "targets.0.pricing.outputPerMillionTokens"),
        ({"pricing": {"inputPerMillionTokens": 1, "outputPerMillionTokens": 1,
                      "batchDiscount": 1.5}}, "targets.0.pricing.batchDiscount"),
        ({"rateLimit": {"pool": "Team_Key"}}, "targets.0.rateLimit.pool"),
        ({"rateLimit": {"pool": "-key"}}, "targets.0.rateLimit.pool"),
    ],
)  # fmt: skip
def test_bad_prices_and_pool_names_are_refused_naming_the_field(
    changes: dict[str, Any], where: str
) -> None:
    with pytest.raises(SpecError, match=f"{where.replace('.', '[.]')}: "):
        parse_spec({"targets": [target(**changes)]})


PRICED = target(pricing={"inputPerMillionTokens": 1, "outputPerMillionTokens": 2})


@pytest.mark.parametrize(
    ("budget", "message"),
    [
        ({"maxCost": 0}, "budget.maxCost: Input should be greater than 0"),
        ({"maxTokens": 0}, "budget.maxTokens: Input should be greater than 0"),
        ({"maxCost": "5"}, "budget.maxCost: Input should be a valid number"),
        ({}, "set maxCost, maxTokens or both"),
    ],
)
def test_a_budget_of_zero_is_refused(budget: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        parse_spec({"targets": [PRICED], "budget": budget})


def test_a_cost_budget_needs_pricing_on_every_target() -> None:
    with pytest.raises(SpecError, match=r"budget\.maxCost needs targets.*pricing.*: u"):
        parse_spec({"targets": [PRICED, target(name="u")], "budget": {"maxCost": 5}})
    parse_spec({"targets": [PRICED, target(name="u")], "budget": {"maxTokens": 5}})


def test_conflicting_limits_of_one_pool_in_a_spec_are_refused() -> None:
    a = target(name="a", rateLimit={"pool": "key", "requestsPerSecond": 20})
    b = target(name="b", rateLimit={"pool": "key", "requestsPerSecond": 30})
    with pytest.raises(SpecError, match=r"targets\.1\.rateLimit: pool 'key' has other limits"):
        parse_spec({"targets": [a, b]})
    c = target(name="c", rateLimit={"pool": "key", "requestsPerSecond": 20})
    assert len(parse_spec({"targets": [a, c]}).targets) == 2


def exhausted(at: datetime | None) -> BudgetState:
    return BudgetState(
        max_cost=2.0, max_tokens=None, spent_cost=1.99, spent_tokens=1000,
        reserved_cost=0.0, reserved_tokens=0, budget_exhausted_at=at,
    )  # fmt: skip


def test_an_exhausted_budget_pauses_the_run_with_the_line_to_continue() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    s = parse_spec({"targets": [PRICED], "budget": {"maxCost": 2}})
    counts = Counts(total=10, pending=5, completed=5)
    used = RunUsage([TargetUsage("t", "run:r:t", 5, 500, 500, 0.0015)])
    seen = Observation(counts, desired=2, ready=2, usage=used, budget=exhausted(now), now=now)
    old: dict[str, Any] = {"phase": "Running"}
    new = reconciled(old, s, seen)
    assert new["phase"] == "Paused"
    cond = get_condition(new, "Paused")
    assert cond is not None and cond["status"] == "True" and cond["reason"] == "BudgetExhausted"
    assert "kubectl patch analysisrun" in cond["message"] and "maxCost" in cond["message"]
    assert "cost 1.99 of 2" in new["message"]
    assert new["usage"]["cost"] == 0.0015 and new["usage"]["targets"][0]["tokensOut"] == 500
    notes = transition_notes(old, new, [])
    assert [n.reason for n in notes] == ["BudgetExhausted"]
    assert transition_notes(new, new, []) == []  # one Event, not one per reconcile
    raised = reconciled(new, s, Observation(counts, 2, 2, usage=used, budget=exhausted(None)))
    assert raised["phase"] == "Running"
    assert get_condition(raised, "Paused")["status"] == "False"  # type: ignore[index]


def test_the_fake_provider_counts_reported_tokens_in_sliding_windows() -> None:
    rec = Recorder()
    for t, tokens in [(0.0, 100), (5.0, 100), (9.9, 100), (10.5, 100), (70.0, 50)]:
        rec.request(t)
        rec.completed(b"k", t, tokens)
    snap = rec.snapshot()
    assert (snap.tokens, snap.max_tokens_10s, snap.max_tokens_60s) == (450, 300, 400)
    assert snap.first_request_at is not None


async def test_an_answer_saying_the_limit_is_exhausted_carries_the_reset() -> None:
    """OpenAI-style x-ratelimit-* headers on a 200: remaining 0 means wait for the reset."""
    cfg = FakeConfig(rate_limit_rps=2, rate_limit_burst=2)
    async with FakeProvider(cfg) as fake, make_http_client(trust_env=False) as client:
        provider = make_provider(Target.model_validate(target(endpoint=fake.url)), client, None)
        first = await provider.complete("one")
        second = await provider.complete("two")
    assert first.limit_reset_s is None  # one request left
    assert second.limit_reset_s is not None and 0.3 < second.limit_reset_s <= 0.5


def test_anthropic_headers_at_zero_are_read_as_the_reset() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    headers = {
        "anthropic-ratelimit-tokens-remaining": "0",
        "anthropic-ratelimit-tokens-reset": "2026-01-01T00:00:07Z",
        "anthropic-ratelimit-requests-remaining": "12",
    }
    assert exhausted_limit_delay(headers, now=now) == 7
    assert exhausted_limit_delay({"x-ratelimit-remaining-tokens": "5"}, now=now) is None

"""The batch driver's pure rules: what fits one provider batch, and who serves a target."""

from __future__ import annotations

import json
import uuid

import httpx
import pytest

from analysisq.providers import make_batch_client
from analysisq.queue.items import ClaimedItem
from analysisq.spec import parse_spec
from analysisq.worker.batch_plan import Plan, sync_targets_skipped

pytestmark = pytest.mark.unit


def item(i: int, text: str) -> ClaimedItem:
    return ClaimedItem(i, uuid.uuid4(), "r", i, f"p{i}", "t", 1, 0, 3, 0, text)


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_fit_cuts_at_max_bytes_and_refuses_what_never_fits(provider: str) -> None:
    spec = parse_spec(
        {"targets": [{"name": "t", "provider": provider, "model": "m", "mode": "batch",
                      "endpoint": "http://127.0.0.1:9/v1", "batch": {"maxBytes": 4000}}]}
    )  # fmt: skip
    target = spec.targets[0]
    client = make_batch_client(target, httpx.AsyncClient(), None)
    claimed = [item(1, "x" * 5000), item(2, "   "), *(item(i, f"prompt {i}") for i in range(3, 60))]
    with client.spool() as body:
        plan = Plan(client, target, body)
        for i in claimed:
            plan.add(i, i.text)
        refused = {i.id: str(e) for i, e in plan.refused}
        assert set(refused) == {1, 2}
        assert "more than one batch may hold (batch.maxBytes 4000)" in refused[1]
        assert "empty" in refused[2]
        assert plan.sent and plan.spill
        assert body.count == len(plan.sent) and body.size <= 4000
        assert len(plan.sent) + len(plan.spill) + 2 == len(claimed)
        cut = body.count // 2
        plan.cut(cut)
        assert body.count == len(plan.sent) == cut
        spool, size = body.finish()
        written = spool.read()
    assert len(written) == size
    ids = [str(i.id) for i in plan.sent]
    if provider == "openai":
        assert [json.loads(line)["custom_id"].split("-")[0] for line in written.splitlines()] == ids
    else:
        requests = json.loads(written)["requests"]
        assert [r["custom_id"].split("-")[0] for r in requests] == ids


def test_the_sync_path_takes_batch_targets_near_the_deadline() -> None:
    targets = [
        {"name": "b", "provider": "openai", "model": "m", "mode": "batch"},
        {"name": "s", "provider": "echo", "model": "m"},
    ]
    assert sync_targets_skipped(parse_spec({"targets": targets})) == ["b"]
    past = parse_spec({"targets": targets, "deadline": "2000-01-01T00:00:00Z"})
    assert sync_targets_skipped(past) == []
    future = parse_spec({"targets": targets, "deadline": "2999-01-01T00:00:00Z"})
    assert sync_targets_skipped(future) == ["b"]

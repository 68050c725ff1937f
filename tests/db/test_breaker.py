"""The per-target circuit breaker: a typo in a model or endpoint pauses its target, burns
no item, and leaves every other target and every prompt-level error alone."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

from analysisq.completion import Completion
from analysisq.errors import ErrorClass, SpecError, TargetFault
from analysisq.fake_provider.config import FakeConfig
from analysisq.fake_provider.server import FakeProvider
from analysisq.queue import items, runs
from analysisq.queue.items import ClaimedItem, Outcome
from analysisq.settings import Settings
from analysisq.spec import AnalysisRunSpec
from analysisq.worker import Worker
from support import add_prompts, new_run, spec

pytestmark = [pytest.mark.db, pytest.mark.timeout(120)]

FAST = Settings(
    database_url="unused", poll_seconds=0.05, retry_base_seconds=0.05, retry_cap_seconds=0.5,
    shutdown_grace_seconds=5,
)  # fmt: skip
NOT_FOUND = TargetFault("HTTP 404: model_not_found", fault="HTTP 404 model_not_found",
                        setting="model")  # fmt: skip
OTHER = TargetFault("HTTP 404: Not Found", fault="HTTP 404", setting="endpoint")
OK = Completion("answer", None, 1, 1, "m", 1.0)


def target(name: str, model: str, url: str) -> dict[str, Any]:
    return {"name": name, "provider": "openai", "model": model, "endpoint": url}


async def run_until(pool: asyncpg.Pool, s: AnalysisRunSpec, done: Any, n: int = 3) -> None:
    """Run *n* workers until ``done(conn)`` holds, then stop them."""
    async with pool.acquire() as db:
        run = await runs.get_run(db, "run-1")
    workers = [Worker(pool, run, FAST, name=f"w{i}") for i in range(n)]
    tasks = [asyncio.create_task(w.run_until_stopped()) for w in workers]
    try:
        for _ in range(400):
            async with pool.acquire() as db:
                if await done(db):
                    break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the run did not get there")
    finally:
        for w in workers:
            w.stop()
        await asyncio.gather(*tasks)


async def by_target(db: asyncpg.Connection) -> dict[tuple[str, str, str | None], int]:
    """Items by (target, status, error class)."""
    rows = await db.fetch(
        "SELECT target, status, error_class, count(*) FROM analysis_queue"
        " GROUP BY 1, 2, 3 ORDER BY 1, 2"
    )
    return {(r[0], r[1], r[2]): r[3] for r in rows}


@pytest.mark.parametrize(
    ("status", "endpoint_path", "setting"),
    [(404, "/v1", "model"), (400, "/v1", "model"), (404, "/v2", "endpoint")],
    ids=["404-model_not_found", "400-invalid-model-name", "404-endpoint-path"],
)
async def test_a_target_fault_pauses_the_target_and_burns_no_item(
    pool: asyncpg.Pool, status: int, endpoint_path: str, setting: str
) -> None:
    cfg = FakeConfig(known_models=["gpt-good"], unknown_model_status=status)  # type: ignore[arg-type]
    async with FakeProvider(cfg) as fake:
        bad_model = "gpt-mok" if setting == "model" else "gpt-good"
        bad_url = fake.url.replace("/v1", endpoint_path)
        s = spec(
            targets=[target("good", "gpt-good", fake.url), target("typo", bad_model, bad_url)],
            targetFaultThreshold=3,
        )
        async with pool.acquire() as db:
            await add_prompts(db, 40)
            await new_run(db, s=s)

        async def good_done_and_typo_paused(db: asyncpg.Connection) -> bool:
            paused = [t for t in await runs.targets(db, "run-1") if t.paused_at]
            seen = await by_target(db)
            return bool(paused) and seen.get(("good", "completed", None)) == 40

        await run_until(pool, s, good_done_and_typo_paused)
        requests = fake.stats().requests
        async with pool.acquire() as db:
            (paused,) = [t for t in await runs.targets(db, "run-1") if t.paused_at]
            assert paused.target == "typo"
            reason = paused.pause_reason or ""
            assert f"fix targets[typo].{setting}" in reason and f"HTTP {status}" in reason
            # nothing of the typo target failed: the items the fault had failed came back
            assert await db.fetch(
                "SELECT target, status, count(*) FROM analysis_queue GROUP BY 1, 2 ORDER BY 1"
            ) == [("good", "completed", 40), ("typo", "pending", 40)]
            assert (
                await db.fetchval(
                    "SELECT count(*) FROM analysis_queue WHERE target = 'typo'"
                    " AND (attempts > 0 OR next_attempt_at <> 'infinity')"
                )
                == 0
            )
            # 40 good answers plus the typo answers of the claims held when it tripped: 3
            # workers x (the batch in flight + the batch prefetched beside it) of 5
            assert requests <= 40 + 3 * 2 * s.batch_size + 3

            # the user fixes the setting and resumes the target: everything completes
            fixed = spec(targets=[target("good", "gpt-good", fake.url),
                                  target("typo", "gpt-good", fake.url)])  # fmt: skip
            await runs.create_run(db, "run-1", fixed)
            assert await runs.resume_targets(db, "run-1", "typo") == ["typo"]

        async def all_done(db: asyncpg.Connection) -> bool:
            return (await runs.counts(db, "run-1")).completed == 80

        await run_until(pool, fixed, all_done)


async def test_a_content_error_on_every_prompt_fails_only_those_prompts(
    pool: asyncpg.Pool,
) -> None:
    """400 context_length_exceeded is the prompt's fault: no pause, however many in a row."""
    async with FakeProvider(FakeConfig(max_prompt_chars=20)) as fake:
        s = spec(targets=[target("t", "m", fake.url)], targetFaultThreshold=2)
        async with pool.acquire() as db:
            await add_prompts(db, 12, text="a prompt that is much too long {i}")
            await new_run(db, s=s)

        async def all_failed(db: asyncpg.Connection) -> bool:
            return (await runs.counts(db, "run-1")).failed_for_good == 12

        await run_until(pool, s, all_failed)
    async with pool.acquire() as db:
        assert [t.paused_at for t in await runs.targets(db, "run-1")] == [None]
        assert await by_target(db) == {("t", "failed", "invalid_input"): 12}


async def claim(db: asyncpg.Connection, n: int) -> list[ClaimedItem]:
    return await items.claim(db, "run-1", worker="w", limit=n, lease_seconds=60)


async def fault(db: asyncpg.Connection, item: ClaimedItem, f: TargetFault = NOT_FOUND) -> None:
    assert await items.fail(db, item, ErrorClass.PERMANENT, f.message, None, fault=f)


async def paused(db: asyncpg.Connection) -> bool:
    return (await runs.targets(db, "run-1"))[0].paused_at is not None


async def test_a_success_or_another_fault_breaks_the_streak(db: asyncpg.Connection) -> None:
    await add_prompts(db, 12)
    await new_run(db, s=spec(targetFaultThreshold=3))
    got = await claim(db, 12)
    await fault(db, got[0])
    await fault(db, got[1])
    assert await items.complete(db, [Outcome(got[2], OK)]) == {got[2].id}
    await fault(db, got[3])
    await fault(db, got[4])
    await fault(db, got[5], OTHER)  # a different fault starts its own streak
    await fault(db, got[6])
    await fault(db, got[7])
    assert not await paused(db)
    await fault(db, got[8])  # the third of NOT_FOUND in a row since got[5]
    assert await paused(db)
    rows = await db.fetch("SELECT id, status, attempts, next_attempt_at = 'infinity' AS parked"
                          " FROM analysis_queue ORDER BY id")  # fmt: skip
    state = {r["id"]: (r["status"], r["attempts"], r["parked"]) for r in rows}
    # the streak's three are given back unspent and parked; earlier failures stay failed
    for i in got[6:9]:
        assert state[i.id] == ("pending", 0, True)
    for i in (*got[0:2], *got[3:6]):
        assert state[i.id][0] == "failed"
    # a fault answered after the pause parks its item at once
    await fault(db, got[9])
    row = await db.fetchrow(
        "SELECT status, attempts, next_attempt_at = 'infinity' FROM analysis_queue WHERE id = $1",
        got[9].id,
    )
    assert tuple(row) == ("pending", 0, True)
    # resuming starts the count over
    assert await runs.resume_targets(db, "run-1") == ["echo"]
    await fault(db, got[10])
    await fault(db, got[11])
    assert not await paused(db)


async def test_a_model_can_be_fixed_until_the_target_has_results(db: asyncpg.Connection) -> None:
    def two(model: str) -> AnalysisRunSpec:
        return spec(targets=[{"name": "a", "provider": "echo", "model": "echo-1"},
                             {"name": "b", "provider": "echo", "model": model}])  # fmt: skip

    await add_prompts(db, 2)
    await new_run(db, s=two("typo"))
    await runs.create_run(db, "run-1", two("fixed"))  # no result yet: the fix is recorded
    assert (await runs.get_run(db, "run-1")).spec.target("b").model == "fixed"
    got = await claim(db, 4)
    b = [i for i in got if i.target == "b"]
    assert await items.complete(db, [Outcome(b[0], OK)]) == {b[0].id}
    with pytest.raises(SpecError, match=r"targets\[b\]: the provider and model cannot change"):
        await runs.create_run(db, "run-1", two("other"))
    assert (await runs.get_run(db, "run-1")).spec.target("b").model == "fixed"

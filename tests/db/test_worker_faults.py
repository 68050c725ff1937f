"""Faults users meet, against a real PostgreSQL: each test reproduces one finding of issue 9.

A re-claimed item keeps its new claim; a lone surrogate or a refused write fails one item
once instead of looping; an answer keeps what can be stored; a lowered maxAttempts strands
nothing, even for a worker started with the old spec.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncpg
import pytest

from analysisq.completion import Completion
from analysisq.errors import PermanentError
from analysisq.fake_provider.config import FakeConfig
from analysisq.fake_provider.server import FakeProvider
from analysisq.providers.base import parse_json_answer
from analysisq.queue import rescue, runs
from analysisq.queue.runs import Run
from analysisq.settings import Settings
from analysisq.spec import Target
from analysisq.worker import Worker
from support import add_prompts, new_run, spec

pytestmark = [pytest.mark.db, pytest.mark.timeout(180)]

FAST = Settings(
    database_url="unused", poll_seconds=0.05, retry_base_seconds=0.05, retry_cap_seconds=0.5,
    shutdown_grace_seconds=5,
)  # fmt: skip
#: Longer than any of these runs takes: a run that has not ended by then loops.
LOOPING = 60.0


def fake_target(url: str, **kw: Any) -> dict[str, Any]:
    return {"name": "fake", "provider": "openai", "model": "m", "endpoint": url, **kw}


async def get_run(pool: asyncpg.Pool) -> Run:
    async with pool.acquire() as db:
        return await runs.get_run(db, "run-1")


class Scripted:
    """A provider whose answer (or error) per prompt the test decides; counts its calls."""

    def __init__(self, target: Target, answer: Any) -> None:
        self.target = target
        self.answer = answer
        self.calls = 0

    async def complete(self, prompt: str) -> Completion:
        self.calls += 1
        result = self.answer(prompt)
        if isinstance(result, Exception):
            raise result
        assert isinstance(result, Completion)
        return result


async def refuse(
    db: asyncpg.Connection, event: str, table: str, condition: str, message: str
) -> None:
    """A trigger of the database that refuses the rows matching *condition* with *message*:
    a real, deterministic refusal of a write."""
    await db.execute(f"""
        CREATE FUNCTION refuse_{table}() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF {condition} THEN RAISE EXCEPTION '{message}'; END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER refuse BEFORE {event} ON {table}
            FOR EACH ROW EXECUTE FUNCTION refuse_{table}();
    """)  # fmt: skip


async def drain_with(pool: asyncpg.Pool, provider: Scripted) -> None:
    w = Worker(pool, await get_run(pool), FAST, name="w", exit_when_done=True,
               providers={provider.target.name: provider})  # fmt: skip
    await asyncio.wait_for(w.run_until_stopped(), LOOPING)


async def test_a_reclaimed_item_keeps_its_new_claim(pool: asyncpg.Pool) -> None:
    """Two leases into a slow call the rescuer takes the item (as after a stall) and the same
    worker claims it again: the stale claim's refused write must not evict the new claim
    (before: three paid answers, no result, failed as poison)."""
    async with FakeProvider(FakeConfig(latency_ms=14_000)) as fake:
        s = spec(targets=[fake_target(fake.url)], leaseSeconds=5, batchSize=2)
        async with pool.acquire() as db:
            await add_prompts(db, 1)
            await new_run(db, s=s)
        w = Worker(pool, await get_run(pool), FAST, name="w", exit_when_done=True)
        task = asyncio.create_task(w.run_until_stopped())
        for _ in range(200):
            if fake.stats().requests:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(2 * s.lease_seconds)
        async with pool.acquire() as db:  # one forced rescue, as after a stall
            await db.execute("UPDATE analysis_queue SET lease_expires_at = now() - interval '1s'")
            assert (await rescue.rescue_stuck(db, "run-1")).reset == 1
        await asyncio.wait_for(task, 90)
        requests = fake.stats().requests
    async with pool.acquire() as db:
        row = await db.fetchrow("SELECT status, error_class, lease_losses FROM analysis_queue")
        results = await db.fetchval("SELECT count(*) FROM analysis_results")
    assert (row["status"], row["lease_losses"], results) == ("completed", 1, 1), dict(row)
    assert requests == 2  # the stale call was cancelled when the item was claimed again


async def test_a_lone_surrogate_in_an_error_fails_the_item_once(pool: asyncpg.Pool) -> None:
    """A gateway cuts an emoji in half in its error body: the item fails, once, saying so
    (before: the write was taken for an outage and the item released, for ever)."""
    cfg = FakeConfig(errors={"400": 1.0}, error_message_suffix="cut \\ud83d")
    async with FakeProvider(cfg) as fake:
        s = spec(targets=[fake_target(fake.url)])
        async with pool.acquire() as db:
            await add_prompts(db, 5)
            await new_run(db, s=s)
        w = Worker(pool, await get_run(pool), FAST, name="w", exit_when_done=True)
        await asyncio.wait_for(w.run_until_stopped(), LOOPING)
        assert fake.stats().requests == 5
    async with pool.acquire() as db:
        rows = await db.fetch("SELECT status, attempts, error_class, error_message"
                              " FROM analysis_queue")  # fmt: skip
    assert {(r["status"], r["attempts"], r["error_class"]) for r in rows} == {
        ("failed", 1, "permanent")
    }
    assert all("400" in r["error_message"] and "cut \ufffd" in r["error_message"] for r in rows)


async def test_a_lone_surrogate_in_a_401_pauses_the_target(
    pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = FakeConfig(require_api_key="s3cret", error_message_suffix="\\ud83d")
    monkeypatch.setenv("AQ_FAULTS_KEY", "wrong")
    async with FakeProvider(cfg) as fake:
        s = spec(targets=[fake_target(fake.url, apiKeyEnv="AQ_FAULTS_KEY")], batchSize=4)
        async with pool.acquire() as db:
            await add_prompts(db, 20)
            await new_run(db, s=s)
        w = Worker(pool, await get_run(pool), FAST, name="w")
        task = asyncio.create_task(w.run_until_stopped())
        for _ in range(400):
            async with pool.acquire() as db:
                paused = [t for t in await runs.targets(db, "run-1") if t.paused_at]
            if paused:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(1)
        w.stop()
        await asyncio.wait_for(task, 30)
        assert fake.stats().requests <= 2 * s.batch_size
    assert paused and "\ufffd" in (paused[0].pause_reason or "")
    async with pool.acquire() as db:
        assert await db.fetchval("SELECT max(attempts) FROM analysis_queue") == 0


async def test_a_result_the_database_refuses_fails_only_its_item(pool: asyncpg.Pool) -> None:
    """A deterministic refusal of one answer's write (here a trigger of the database) fails
    that item with the database's reason; its batch-mates complete, nothing is asked twice."""
    s = spec()
    async with pool.acquire() as db:
        await add_prompts(db, 6, text="prompt {i}")
        await new_run(db, s=s)
        await refuse(db, "INSERT", "analysis_results", "NEW.response_text LIKE 'refuse%'",
                     "answers of this kind are not stored here")  # fmt: skip

    def answer(prompt: str) -> Completion:
        text = "refuse me" if prompt.endswith(("1", "4")) else "fine"
        return Completion(text, None, 1, 1, "m", 1.0)

    provider = Scripted(s.targets[0], answer)
    await drain_with(pool, provider)
    async with pool.acquire() as db:
        rows = await db.fetch("SELECT status, error_class, error_message FROM analysis_queue"
                              " WHERE status = 'failed'")  # fmt: skip
        counts = await runs.counts(db, "run-1")
    assert (counts.completed, counts.failed_for_good, provider.calls) == (4, 2, 6)
    assert {r["error_class"] for r in rows} == {"permanent"}
    assert all(
        r["error_message"].startswith("the database refused to store the answer")
        and "answers of this kind are not stored here" in r["error_message"]
        for r in rows
    )


async def test_a_failure_the_database_refuses_fails_the_item_clearly(pool: asyncpg.Pool) -> None:
    s = spec()
    async with pool.acquire() as db:
        await add_prompts(db, 3)
        await new_run(db, s=s)
        await refuse(db, "UPDATE", "analysis_queue", "NEW.error_message LIKE '%unstorable reason%'",
                     "this error message is refused")  # fmt: skip
    provider = Scripted(s.targets[0], lambda _: PermanentError("400: unstorable reason"))
    await drain_with(pool, provider)
    async with pool.acquire() as db:
        rows = await db.fetch("SELECT status, attempts, error_class, error_message"
                              " FROM analysis_queue")  # fmt: skip
    assert provider.calls == 3
    assert {(r["status"], r["attempts"], r["error_class"]) for r in rows} == {
        ("failed", 1, "permanent")
    }
    assert all(
        r["error_message"].startswith("the database refused to record this item's outcome")
        and "this error message is refused" in r["error_message"]
        for r in rows
    )


async def test_an_answer_keeps_what_can_be_stored(pool: asyncpg.Pool) -> None:
    """Parsed JSON with a lone surrogate, NaN or a literal backslash-u0000, token counts past
    2^31: the answer is stored at its first attempt, with NULL for what cannot be."""
    s = spec()
    async with pool.acquire() as db:
        await add_prompts(db, 2, text="prompt {i}")
        await new_run(db, s=s)
    parsed = {"cut": "\ud83d", "literal": "\\u0000", "nul": "a\x00b", "k\x00": 1}

    def answer(prompt: str) -> Completion:
        if prompt.endswith("0"):
            return Completion("t\ud83d", parsed, 2**31, 7, "m", 1.0)
        return Completion("nan", {"x": float("nan")}, -1, 3, "m", 2.0)

    provider = Scripted(s.targets[0], answer)
    await drain_with(pool, provider)
    async with pool.acquire() as db:
        rows = await db.fetch(
            "SELECT r.response_text, r.parsed, r.tokens_in, r.tokens_out, r.attempt"
            " FROM analysis_results r JOIN prompts p ON p.id = r.prompt_tracking_id"
            " ORDER BY p.external_id"
        )
    assert provider.calls == 2 and len(rows) == 2
    first, second = rows
    assert first["response_text"] == "t\ufffd"
    assert json.loads(first["parsed"]) == {
        "cut": "\ufffd", "literal": "\\u0000", "nul": "a\ufffdb", "k\ufffd": 1
    }  # fmt: skip
    assert (first["tokens_in"], first["tokens_out"], first["attempt"]) == (None, 7, 1)
    assert (second["parsed"], second["tokens_in"], second["tokens_out"]) == (None, None, 3)


async def test_an_answer_parsed_from_its_text_is_stored_from_it_repaired(
    pool: asyncpg.Pool,
) -> None:
    """A provider's answer carries the JSON text it was parsed from (``parsed_json``), which
    is stored as it is; text jsonb would refuse (a NUL escape, a lone surrogate escape, NaN)
    is stored repaired from the parsed value instead, at the first attempt."""
    s = spec()
    async with pool.acquire() as db:
        await add_prompts(db, 3, text="prompt {i}")
        await new_run(db, s=s)
    texts = {
        "0": '```json\n{"nul": "a\\u0000b", "cut": "\\ud83d", "ok": "\u00e9"}\n```',
        "1": '{"a": [1, 2.50, "\U0001f600"], "b": {"c": null}}',
        "2": '{"x": NaN}',
    }

    def answer(prompt: str) -> Completion:
        text = texts[prompt[-1]]
        parsed, parsed_json = parse_json_answer(text)
        return Completion(text, parsed, 1, 1, "m", 1.0, parsed_json=parsed_json)

    await drain_with(pool, Scripted(s.targets[0], answer))
    async with pool.acquire() as db:
        rows = await db.fetch(
            "SELECT r.parsed, r.attempt FROM analysis_results r"
            " JOIN prompts p ON p.id = r.prompt_tracking_id ORDER BY p.external_id"
        )
    assert [r["attempt"] for r in rows] == [1, 1, 1]
    assert json.loads(rows[0]["parsed"]) == {"nul": "a\ufffdb", "cut": "\ufffd", "ok": "é"}
    assert json.loads(rows[1]["parsed"]) == {"a": [1, 2.50, "😀"], "b": {"c": None}}
    assert rows[2]["parsed"] is None


async def test_lowering_max_attempts_strands_no_pending_item(pool: asyncpg.Pool) -> None:
    """An item released after a 429 waits with one attempt spent; maxAttempts drops to 1. A
    worker started with the old spec (maxAttempts 3, as an old pod in a rollout) must fail it
    for good, not claim it, and the run ends."""
    async with pool.acquire() as db:
        await add_prompts(db, 2)
        await new_run(db, s=spec(maxAttempts=3))
        old = await runs.get_run(db, "run-1")
        await db.execute(
            "UPDATE analysis_queue SET attempts = 1, deferrals = 1, error_class = 'rate_limited',"
            " error_message = '429 from provider'"
            " WHERE id = (SELECT min(id) FROM analysis_queue)"
        )
        await runs.create_run(db, "run-1", spec(maxAttempts=1))
    provider = Scripted(old.spec.targets[0], lambda _: Completion("ok", None, 1, 1, "m", 1.0))
    w = Worker(pool, old, FAST, name="old-pod", exit_when_done=True,
               providers={"echo": provider})  # fmt: skip
    await asyncio.wait_for(w.run_until_stopped(), LOOPING)
    async with pool.acquire() as db:
        rows = await db.fetch("SELECT status, attempts, error_message FROM analysis_queue"
                              " ORDER BY id")  # fmt: skip
    assert provider.calls == 1  # only the item with an attempt left was sent
    assert [(r["status"], r["attempts"]) for r in rows] == [("failed", 1), ("completed", 1)]
    assert rows[0]["error_message"] == "gave up after 1 attempts: 429 from provider"

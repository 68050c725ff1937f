"""``analysisq run`` as a person runs it, as a subprocess, with its own worker processes,
against the fake provider: kill -9 of one of its workers half-way, and Ctrl-C half-way then
``--resume``. Either way every item ends terminal, none is stuck, and each has one result.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import psutil
import pytest

from analysisq.fake_provider import FakeConfig, FakeProvider
from analysisq.queue import runs
from support import add_prompts

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(240)]

PROMPTS = 300
#: Flaky but quick: 10% transient errors, 30-130 ms, and a rate the run must keep to.
FAKE = FakeConfig(latency_ms=80, jitter_ms=50, errors={"500": 0.06, "503": 0.04}, seed=3)


@dataclass
class RunProcess:
    """One ``analysisq run`` subprocess and its output file."""

    proc: asyncio.subprocess.Process
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    async def wait(self, timeout: float = 150) -> int:
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            raise AssertionError(f"analysisq run did not end:\n{self.output()[-4000:]}") from None


@pytest.fixture
async def fake() -> AsyncIterator[FakeProvider]:
    async with FakeProvider(FAKE) as provider:
        yield provider


@pytest.fixture
async def start_run(db_url: str, tmp_path: Path) -> AsyncIterator[object]:
    started: list[RunProcess] = []

    async def start(*args: str, **extra_env: str) -> RunProcess:
        log = tmp_path / f"run-{len(started)}.log"
        env = {
            **os.environ,
            "DATABASE_URL": db_url,
            "ANALYSISQ_DATA_DIR": str(tmp_path / "data"),
            "ANALYSISQ_POLL_SECONDS": "0.2",
            "ANALYSISQ_RETRY_BASE_SECONDS": "0.2",
            "ANALYSISQ_RETRY_CAP_SECONDS": "2",
            "ANALYSISQ_RESCUE_INTERVAL_SECONDS": "2",
            "ANALYSISQ_PROGRESS_INTERVAL_SECONDS": "1",
            "ANALYSISQ_SHUTDOWN_GRACE_SECONDS": "5",
            **extra_env,
        }
        with log.open("wb") as out:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "analysisq", "run", *args,
                stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=asyncio.subprocess.STDOUT,
                env=env,
            )  # fmt: skip
        started.append(RunProcess(proc, log))
        return started[-1]

    yield start
    for run in started:  # a failed test must not leave a run (or its workers) behind
        if run.proc.returncode is None:
            run.proc.kill()
            await run.proc.wait()


def run_args(fake: FakeProvider, *extra: str, lease: int = 5) -> list[str]:
    return [
        "--target", f"fake=openai:gpt-4o-mini@{fake.url}",
        "--workers", "4", "--lease-seconds", str(lease), "--max-attempts", "5", "--rps", "40",
        *extra,
    ]  # fmt: skip


async def wait_until_done_at_least(db: asyncpg.Connection, n: int, run: RunProcess) -> str:
    """The run's id once *n* of its items are terminal. No deadline of its own: a loaded
    machine starts the workers late (the test's timeout is the bound); a run that ended
    before is a failure with its output."""
    while True:
        run_id = await db.fetchval("SELECT id FROM analysis_runs ORDER BY created_at DESC")
        if run_id and (await runs.counts(db, run_id)).terminal >= n:
            return str(run_id)
        assert run.proc.returncode is None, f"the run ended first:\n{run.output()[-3000:]}"
        await asyncio.sleep(0.1)


async def assert_complete_once(
    db: asyncpg.Connection,
    run_id: str,
    results_file: Path,
    fake: FakeProvider,
    total: int = PROMPTS,
) -> None:
    counts = await runs.counts(db, run_id)
    assert counts.total == total
    assert counts.done and counts.stuck == 0 and counts.processing == 0, counts
    assert counts.completed == total, counts
    results = await db.fetchval("SELECT count(*) FROM analysis_results WHERE run_id = $1", run_id)
    distinct = await db.fetchval(
        "SELECT count(DISTINCT queue_id) FROM analysis_results WHERE run_id = $1", run_id
    )
    assert results == distinct == counts.completed
    text = await asyncio.to_thread(results_file.read_text)
    exported = [json.loads(line) for line in text.splitlines()]
    assert len(exported) == len({r["prompt_id"] for r in exported}) == total
    assert await db.fetchval("SELECT finished_at IS NOT NULL FROM analysis_runs") is True
    assert fake.stats().prompts_completed == total


async def test_kill_a_worker_half_way(
    db: asyncpg.Connection, fake: FakeProvider, start_run: object, tmp_path: Path
) -> None:
    await add_prompts(db, PROMPTS)
    run = await start_run(*run_args(fake))  # type: ignore[operator]
    run_id = await wait_until_done_at_least(db, PROMPTS // 3, run)

    # a worker that holds claims right now: its lease owner is host:pid
    owners = await db.fetch(
        "SELECT lease_owner, count(*) AS held FROM analysis_queue"
        " WHERE status = 'processing' GROUP BY lease_owner ORDER BY count(*) DESC"
    )
    assert owners, "no worker holds an item half-way"
    victim = int(owners[0]["lease_owner"].rsplit(":", 1)[1])
    children = {p.pid for p in psutil.Process(run.proc.pid).children()}
    assert victim in children, (victim, children)
    os.kill(victim, signal.SIGKILL)

    assert await run.wait() == 0, run.output()
    output = run.output()
    assert re.search(rf"worker \d \(pid {victim}\) was killed by SIGKILL; restarting it", output)
    assert "Workers: 1 unexpected exits, each restarted." in output
    await assert_complete_once(db, run_id, tmp_path / "data/runs" / run_id / "results.jsonl", fake)
    lost = await db.fetchval("SELECT count(*) FROM analysis_queue WHERE lease_losses > 0")
    assert 1 <= lost <= owners[0]["held"]
    # the killed worker may have had answers it never wrote: those prompts were asked again
    stats = fake.stats()
    assert stats.prompts_completed_more_than_once <= owners[0]["held"]
    assert not [pid for pid in children if psutil.pid_exists(pid)], "workers outlived the run"


@pytest.mark.timeout(480)
async def test_interrupt_and_resume(
    db: asyncpg.Connection, fake: FakeProvider, start_run: object, tmp_path: Path
) -> None:
    """Ctrl-C half-way: the workers release what they hold, unspent, and ``--resume`` ends
    the run with one result per item. What is tested is the graceful path, so a loaded
    machine must not turn it into another one: leases of 30 s (a late heartbeat loses no
    claim) and a 30 s shutdown grace (a slow worker is not killed before it has released)."""
    await add_prompts(db, PROMPTS)
    results_file = tmp_path / "out" / "results.jsonl"
    args = run_args(fake, "--output", str(results_file), lease=30)
    first = await start_run(*args, ANALYSISQ_SHUTDOWN_GRACE_SECONDS="30")  # type: ignore[operator]
    run_id = await wait_until_done_at_least(db, PROMPTS // 3, first)
    first.proc.send_signal(signal.SIGINT)

    assert await first.wait(timeout=300) == 130, first.output()
    assert f"Nothing is lost. Continue with: analysisq run --resume {run_id}" in first.output()
    counts = await runs.counts(db, run_id)
    assert counts.processing == 0, "workers must release what they hold"
    assert 0 < counts.terminal < PROMPTS, counts
    assert not results_file.exists()
    # released items did not spend an attempt: every item that never failed has 0 or 1
    assert (
        await db.fetchval(
            "SELECT count(*) FROM analysis_queue WHERE status = 'pending' AND attempts > 0"
            " AND error_class IS NULL"
        )
        == 0
    )

    second = await start_run("--resume", run_id, "--output", str(results_file))  # type: ignore[operator]
    assert await second.wait(timeout=300) == 0, second.output()
    assert f"Resuming run {run_id}: {counts.terminal:,} of {PROMPTS} items already done" in (
        second.output()
    )
    await assert_complete_once(db, run_id, results_file, fake)
    # a graceful stop writes what it finished: no prompt was answered twice
    assert fake.stats().prompts_completed_more_than_once == 0


async def test_auth_failure_pauses_then_resume_with_the_key(
    db: asyncpg.Connection, fake: FakeProvider, start_run: object, tmp_path: Path
) -> None:
    """A wrong key pauses the target: the run stops (exit 3) instead of burning every item,
    and ``--resume`` with the key set un-pauses it and finishes."""
    await add_prompts(db, 100)
    fake.configure(FAKE.model_copy(update={"require_api_key": "s3cret"}))
    first = await start_run(*run_args(fake))  # type: ignore[operator]
    assert await first.wait() == 3, first.output()
    run_id = await db.fetchval("SELECT id FROM analysis_runs")
    assert "Target 'fake' is PAUSED: " in first.output()
    assert f"API key (ANALYSISQ_API_KEY_FAKE), then: analysisq run --resume {run_id}" in (
        first.output()
    )
    counts = await runs.counts(db, run_id)
    assert counts.completed == counts.failed_for_good == counts.processing == 0, counts
    assert await db.fetchval("SELECT max(attempts) FROM analysis_queue") == 0

    second = await start_run("--resume", run_id, ANALYSISQ_API_KEY_FAKE="s3cret")  # type: ignore[operator]
    assert await second.wait() == 0, second.output()
    assert "Un-paused targets fake" in second.output()
    results = tmp_path / "data/runs" / run_id / "results.jsonl"
    await assert_complete_once(db, run_id, results, fake, total=100)


async def test_budget_pauses_the_run_and_resume_with_a_larger_budget(
    db: asyncpg.Connection, fake: FakeProvider, start_run: object, tmp_path: Path
) -> None:
    """A budget for about half the items: exit 3 with every other item pending and the
    ``--resume RUN --budget`` line; resumed with it, the run completes."""
    await add_prompts(db, 40, text="The budget prompt number {i:04d}.")  # 8 tokens
    fake.configure(FakeConfig(usage_factor=1.0))  # each answer costs exactly its estimate
    spec = tmp_path / "run.yaml"
    spec.write_text(
        "targets:\n"
        f"  - {{name: fake, provider: openai, model: m, endpoint: '{fake.url}',\n"
        "     params: {max_tokens: 92},\n"
        "     pricing: {inputPerMillionTokens: 10000, outputPerMillionTokens: 10000}}\n"
        "budget: {maxCost: 20.5}\n"  # 100 tokens = 1.0 per item: 20 items fit
    )
    first = await start_run("--spec", str(spec), "--workers", "2")  # type: ignore[operator]
    assert await first.wait() == 3, first.output()
    run_id = await db.fetchval("SELECT id FROM analysis_runs")
    counts = await runs.counts(db, run_id)
    assert (counts.completed, counts.pending, counts.failed_for_good) == (20, 20, 0), counts
    assert (
        await db.fetchval("SELECT max(attempts) FROM analysis_queue WHERE status = 'pending'") == 0
    )
    output = first.output()
    assert "Budget EXHAUSTED (the run is paused): spent cost 20 of 20.5." in output
    line = f"Raise it and continue: analysisq run --resume {run_id} --budget maxCost=41"
    assert line in output
    assert "cost 20 (pool run:" in output  # per target

    second = await start_run("--resume", run_id, "--budget", "maxCost=41")  # type: ignore[operator]
    assert await second.wait() == 0, second.output()
    assert f"Budget of run {run_id} set to maxCost=41." in second.output()
    await assert_complete_once(
        db, run_id, tmp_path / "data/runs" / run_id / "results.jsonl", fake, total=40
    )
    exported = (tmp_path / "data/runs" / run_id / "results.jsonl").read_text().splitlines()
    assert {json.loads(r)["cost"] for r in exported} == {1.0}


async def test_a_model_typo_pauses_then_resume_with_the_fixed_model(
    db: asyncpg.Connection, fake: FakeProvider, start_run: object, tmp_path: Path
) -> None:
    """A misspelt model (404 model_not_found) stops the run (exit 3) with nothing burnt and
    says what to fix; ``--resume RUN --target NAME=...`` corrects the target and finishes."""
    await add_prompts(db, 100)
    fake.configure(FAKE.model_copy(update={"known_models": ["gpt-4o-mini"], "errors": {}}))
    args = run_args(fake)
    args[1] = f"fake=openai:gpt-4o-mni@{fake.url}"
    first = await start_run(*args)  # type: ignore[operator]
    assert await first.wait() == 3, first.output()
    run_id = await db.fetchval("SELECT id FROM analysis_runs")
    out = " ".join(first.output().split())
    assert "Target 'fake' is PAUSED: 3 answers in a row" in out
    assert "fix targets[fake].model (the provider does not know it)" in out
    assert f"Fix the setting each reason names, then: analysisq run --resume {run_id}" in out
    counts = await runs.counts(db, run_id)
    assert counts.completed == counts.failed_for_good == counts.processing == 0, counts
    assert await db.fetchval("SELECT max(attempts) FROM analysis_queue") == 0

    second = await start_run("--resume", run_id, "--target", "fake=openai:gpt-4o-mini")  # type: ignore[operator]
    assert await second.wait() == 0, second.output()
    assert (await runs.get_run(db, run_id)).spec.target("fake").endpoint == fake.url
    results = tmp_path / "data/runs" / run_id / "results.jsonl"
    await assert_complete_once(db, run_id, results, fake, total=100)


async def test_retry_after_a_fix_runs_a_finished_run_again(
    db: asyncpg.Connection, db_url: str, fake: FakeProvider, start_run: object, tmp_path: Path
) -> None:
    """A run that ended with permanent failures: ``analysisq retry`` puts them back and
    ``--resume`` finishes the run with every item completed once."""
    await add_prompts(db, 100)
    fake.configure(FAKE.model_copy(update={"errors": {"400": 0.2}}))
    first = await start_run(*run_args(fake))  # type: ignore[operator]
    assert await first.wait() == 1, first.output()  # too many failed for good
    run_id = await db.fetchval("SELECT id FROM analysis_runs")
    failed = (await runs.counts(db, run_id)).failed_for_good
    assert failed >= 5

    fake.configure(FAKE.model_copy(update={"errors": {}}))  # the cause is fixed
    retry = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "analysisq", "retry", run_id, "--class", "permanent",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "DATABASE_URL": db_url},
    )  # fmt: skip
    out, _ = await retry.communicate()
    assert retry.returncode == 0, out
    assert f"put {failed} failed items of run {run_id} back" in out.decode()

    second = await start_run("--resume", run_id)  # type: ignore[operator]
    assert await second.wait() == 0, second.output()
    results = tmp_path / "data/runs" / run_id / "results.jsonl"
    await assert_complete_once(db, run_id, results, fake, total=100)

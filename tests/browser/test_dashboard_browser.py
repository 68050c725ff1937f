"""The dashboard in a real browser: Debian's Chromium driven by Playwright.

A run is in progress (a worker draining it through the fake provider, slowed down) while the
runs page is open: its progress moves without a reload. Then the page of a run whose items
all failed: clicking "Retry failed" puts them back, as the database shows. Screenshots of
each step go to the test's tmp directory (``docs/dashboard.png`` is one of them).
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from analysisq.dashboard.actions import LocalActions
from analysisq.dashboard.app import start
from analysisq.dashboard.context import DashboardContext
from analysisq.dashboard.guard import Guard
from analysisq.fake_provider.config import FakeConfig
from analysisq.fake_provider.server import FakeProvider
from analysisq.queue import runs
from analysisq.settings import Settings
from analysisq.worker import Worker
from support import add_prompts, spec

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]

CHROMIUM = os.environ.get("ANALYSISQ_CHROMIUM", "/usr/bin/chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
FAST = Settings(database_url="unused", poll_seconds=0.05, retry_base_seconds=0.05)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    assert shutil.which(CHROMIUM), f"{CHROMIUM} missing: run tests/tools/system-packages.sh"
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            yield b
        finally:
            await b.close()


@pytest.fixture
async def dashboard_url(db_url: str) -> AsyncIterator[str]:
    ctx = DashboardContext(
        db_url, Guard.create(allow_actions=True), LocalActions(), refresh_seconds=1
    )
    runner, port = await start(ctx, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def worker_for(pool: asyncpg.Pool, run_id: str) -> Worker:
    async with pool.acquire() as conn:
        run = await runs.get_run(conn, run_id)
    return Worker(pool, run, FAST, name=f"w-{run_id}", exit_when_done=True)


async def progress_of(page: Page, run_id: str) -> float:
    cell = page.locator(f"#runs tr:has(a[href='/runs/{run_id}']) .pct")
    return float((await cell.inner_text()).rstrip("%"))


async def test_progress_moves_without_reload_and_retry_failed_works(
    browser: Browser, dashboard_url: str, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    async with (
        FakeProvider(FakeConfig(errors={"400": 1.0})) as refusing,
        FakeProvider(FakeConfig(latency_ms=250)) as slow,
    ):
        async with pool.acquire() as db:
            ids = await add_prompts(db, 60, text="Summarise the review number {i} in one line.")
            target = {"provider": "openai", "model": "gpt-4o-mini"}
            bad = spec(
                prompts={"ids": ids[:8]},
                targets=[{"name": "refusing", "endpoint": refusing.url, **target}],
            )
            live = spec(batchSize=1, targets=[{"name": "slow", "endpoint": slow.url, **target}])
            for run_id, s in (("nightly-bad", bad), ("nightly", live)):
                await runs.create_run(db, run_id, s)
                await runs.fill(db, run_id, s)
        await (await worker_for(pool, "nightly-bad")).run_until_stopped()

        page = await browser.new_page(viewport={"width": 1280, "height": 900})
        await page.goto(dashboard_url + "/")
        await page.evaluate("window.__notReloaded = true")
        before = await progress_of(page, "nightly")
        await page.screenshot(path=tmp_path / "runs-before.png", full_page=True)

        draining = asyncio.create_task((await worker_for(pool, "nightly")).run_until_stopped())
        try:
            for _ in range(60):
                await asyncio.sleep(0.5)
                if await progress_of(page, "nightly") > before:
                    break
            after = await progress_of(page, "nightly")
            assert after > before, "the progress did not move on the open page"
            assert await page.evaluate("window.__notReloaded === true"), "the page reloaded"
            await page.screenshot(path=tmp_path / "runs-live.png", full_page=True)

            await page.click("a[href='/runs/nightly']")
            await expect(page.locator("#targets td", has_text="slow")).to_be_visible()
            await expect(page.locator("#chart canvas")).to_be_visible()
            await page.screenshot(path=tmp_path / "run-live.png", full_page=True)
        finally:
            draining.cancel()

        await page.goto(dashboard_url + "/runs/nightly-bad")
        await expect(page.locator("#errors td", has_text="permanent").first).to_be_visible()
        await expect(
            page.locator("#failed td", has_text="Summarise the review").first
        ).to_be_visible()
        await page.screenshot(path=tmp_path / "run-failed.png", full_page=True)
        await page.get_by_role("button", name="Retry failed").click()
        await expect(page.locator("#toast")).to_have_text("retried 8 items")
        async with pool.acquire() as db:
            counts = await runs.counts(db, "nightly-bad")
        assert counts.failed_for_good == 0 and counts.pending == 8
        await expect(page.locator(".count[data-name=pending] dd")).to_have_text("8")
        await page.screenshot(path=tmp_path / "run-retried.png", full_page=True)
        for shot in ("runs-live.png", "run-live.png", "run-failed.png", "run-retried.png"):
            assert (tmp_path / shot).stat().st_size > 10_000

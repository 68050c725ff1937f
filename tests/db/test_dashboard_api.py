"""The dashboard's JSON API and its guard against a real PostgreSQL, over real HTTP.

Three runs made by real workers: ``done`` (echo provider, every item completed), ``bad``
(the fake provider refuses every prompt with a permanent 400: the run failed) and ``live``
(filled, no worker yet: running). The app is served on a free port of 127.0.0.1.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import pytest

from analysisq.dashboard.actions import LocalActions
from analysisq.dashboard.app import start
from analysisq.dashboard.context import DashboardContext
from analysisq.dashboard.guard import Guard
from analysisq.fake_provider.config import FakeConfig
from analysisq.fake_provider.server import FakeProvider
from analysisq.queue import batches, runs, usage
from analysisq.settings import Settings
from analysisq.worker import Worker
from support import add_prompts, spec

pytestmark = [pytest.mark.db, pytest.mark.timeout(120)]

FAST = Settings(database_url="unused", poll_seconds=0.05, retry_base_seconds=0.05)


async def drain(pool: asyncpg.Pool, run_id: str) -> None:
    async with pool.acquire() as conn:
        run = await runs.get_run(conn, run_id)
    await Worker(pool, run, FAST, name=f"w-{run_id}", exit_when_done=True).run_until_stopped()


async def make_runs(pool: asyncpg.Pool, fake_url: str) -> None:
    """``done``: 20 items completed; ``bad``: 10 items failed for good; ``live``: 30 open."""
    async with pool.acquire() as db:
        ids = await add_prompts(db, 30, text="Prompt {i}: " + "a long prompt text " * 20)
        s_done = spec(prompts={"ids": ids[:20]})
        s_bad = spec(
            prompts={"ids": ids[:10]},
            targets=[{"name": "fake", "provider": "openai", "model": "m", "endpoint": fake_url}],
        )
        for run_id, s in (("done", s_done), ("bad", s_bad), ("live", spec())):
            await runs.create_run(db, run_id, s)
            await runs.fill(db, run_id, s)
    await drain(pool, "done")
    await drain(pool, "bad")


@dataclass
class Dashboard:
    url: str
    client: httpx.AsyncClient
    csrf: str

    async def post(self, path: str, body: Any = None, **headers: str) -> httpx.Response:
        h = {"X-CSRF-Token": self.csrf, **headers}
        return await self.client.post(path, json=body or {}, headers=h)


async def serve(db_url: str, *, allow_actions: bool) -> AsyncIterator[Dashboard]:
    guard = Guard.create(allow_actions=allow_actions)
    ctx = DashboardContext(db_url, guard, LocalActions(), refresh_seconds=1)
    runner, port = await start(ctx, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            yield Dashboard(url, client, guard.csrf_token)
    finally:
        await runner.cleanup()


@pytest.fixture
async def three_runs(pool: asyncpg.Pool) -> AsyncIterator[None]:
    async with FakeProvider(FakeConfig(errors={"400": 1.0})) as fake:
        await make_runs(pool, fake.url)
    yield


@pytest.fixture
async def dash(db_url: str, three_runs: None) -> AsyncIterator[Dashboard]:
    async for d in serve(db_url, allow_actions=True):
        yield d


@pytest.fixture
async def readonly(db_url: str, three_runs: None) -> AsyncIterator[Dashboard]:
    async for d in serve(db_url, allow_actions=False):
        yield d


async def test_runs_newest_first_with_phase_counts_and_progress(dash: Dashboard) -> None:
    r = await dash.client.get("/api/runs")
    assert r.status_code == 200
    by_id = {run["id"]: run for run in r.json()["runs"]}
    assert [run["id"] for run in r.json()["runs"]] == ["live", "bad", "done"]
    assert by_id["done"]["phase"] == "Succeeded" and by_id["done"]["progress"] == 1.0
    assert by_id["done"]["counts"]["completed"] == 20
    assert by_id["bad"]["phase"] == "Failed" and by_id["bad"]["counts"]["failed"] == 10
    assert by_id["live"]["phase"] == "Running" and by_id["live"]["counts"]["pending"] == 30
    assert by_id["live"]["eta_seconds"] is None  # nothing completes: no ETA
    assert by_id["done"]["throughput"] > 0  # completed within the last minute


async def test_one_run_and_its_panels(dash: Dashboard) -> None:
    r = await dash.client.get("/api/runs/done")
    assert r.status_code == 200 and r.json()["run"]["counts"]["total"] == 20
    assert r.json()["actions"] == {
        "enabled": True,
        "token_required": False,
        "available": ["resume-target", "retry"],
    }
    points = (await dash.client.get("/api/runs/done/timeline?buckets=10")).json()["points"]
    assert len(points) == 11
    assert points[0]["completed"] == 0 and points[0]["open"] == 20
    assert points[-1] == {**points[-1], "completed": 20, "failed": 0, "open": 0}
    assert [p["completed"] for p in points] == sorted(p["completed"] for p in points)

    (target,) = (await dash.client.get("/api/runs/done/targets")).json()["targets"]
    assert target["target"] == "echo" and target["completed"] == 20
    assert target["latency_p50_ms"] is not None and target["tokens_out"] > 0
    assert target["cost"] is None  # no pricing on this target


async def test_failed_run_errors_and_failed_items_show_excerpts_only(dash: Dashboard) -> None:
    (err,) = (await dash.client.get("/api/runs/bad/errors")).json()["errors"]
    assert err["error_class"] == "permanent" and err["count"] == 10
    items = (await dash.client.get("/api/runs/bad/failed?limit=5")).json()["items"]
    assert len(items) == 5
    for item in items:
        assert item["will_retry"] is False
        assert item["prompt_chars"] > 160 and len(item["prompt_excerpt"]) == 160
    assert (await dash.client.get("/api/runs/live/stuck")).json()["items"] == []


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/api/runs/nope", 404, "run_not_found"),
        ("/api/runs/nope/timeline", 404, "run_not_found"),
        ("/api/runs/nope/failed", 404, "run_not_found"),
        ("/api/runs/nope/batches", 404, "run_not_found"),
        ("/api/runs?limit=abc", 400, "bad_request"),
        ("/api/runs/done/timeline?buckets=100000", 400, "bad_request"),
        ("/api/runs/done/failed?limit=-1", 400, "bad_request"),
    ],
)
async def test_bad_input_is_a_clear_json_error(
    dash: Dashboard, path: str, status: int, code: str
) -> None:
    r = await dash.client.get(path)
    assert r.status_code == status
    assert r.json()["error"]["code"] == code
    assert "Traceback" not in r.text


async def test_unknown_run_page_is_a_page_not_a_traceback(dash: Dashboard) -> None:
    r = await dash.client.get("/runs/nope")
    assert r.status_code == 404 and "text/html" in r.headers["content-type"]
    assert "no run &#x27;nope&#x27;" in r.text and "Traceback" not in r.text


async def test_database_down_is_503_without_url_or_traceback(three_runs: None) -> None:
    url = "postgresql://aq:s3cret-pw@127.0.0.1:1/nowhere"
    async for d in serve(url, allow_actions=True):
        api = await d.client.get("/api/runs")
        page = await d.client.get("/")
        assert api.status_code == page.status_code == 503
        assert api.json()["error"]["code"] == "database_unavailable"
        for r in (api, page):
            assert "s3cret-pw" not in r.text and "Traceback" not in r.text


async def test_actions_refused_when_disabled(readonly: Dashboard, db: asyncpg.Connection) -> None:
    await db.execute(
        "UPDATE run_targets SET paused_at = now(), pause_reason = 'auth' WHERE run_id = 'live'"
    )
    r = await readonly.post("/api/runs/live/resume-target", {"target": "echo"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "actions_disabled"
    assert await db.fetchval("SELECT paused_at IS NOT NULL FROM run_targets WHERE run_id='live'")
    assert (await readonly.client.get("/api/runs/live")).json()["actions"]["available"] == []


async def test_resume_target_applied_when_enabled(dash: Dashboard, db: asyncpg.Connection) -> None:
    await runs.pause_target(db, "live", "echo", "401 from the provider")
    r = await dash.post("/api/runs/live/resume-target", {"target": "echo"})
    assert r.status_code == 200 and r.json()["resumed"] == ["echo"]
    assert await db.fetchval("SELECT paused_at IS NULL FROM run_targets WHERE run_id='live'")


async def test_local_suspend_is_a_clear_conflict(dash: Dashboard) -> None:
    r = await dash.post("/api/runs/live/suspend")
    assert r.status_code == 409 and r.json()["error"]["code"] == "action_unavailable"


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "http://evil.example"},
        {"Sec-Fetch-Site": "cross-site"},
        {"X-CSRF-Token": "guessed"},
    ],
    ids=["foreign-origin", "cross-site-fetch", "wrong-token"],
)
async def test_cross_site_post_is_refused(
    dash: Dashboard, db: asyncpg.Connection, headers: dict[str, str]
) -> None:
    await runs.pause_target(db, "live", "echo", "401")
    r = await dash.post("/api/runs/live/resume-target", {"target": "echo"}, **headers)
    assert r.status_code == 403 and r.json()["error"]["code"] == "cross_site_refused"
    assert await db.fetchval("SELECT paused_at IS NOT NULL FROM run_targets WHERE run_id='live'")


async def test_a_form_post_without_the_token_is_refused(dash: Dashboard) -> None:
    """What a cross-site HTML form can send: urlencoded, no custom header."""
    r = await dash.client.post("/api/runs/live/resume-target", data={"target": "echo"})
    assert r.status_code == 403


async def test_dns_rebinding_host_is_refused(dash: Dashboard) -> None:
    r = await dash.client.get("/api/runs", headers={"Host": "evil.example"})
    assert r.status_code == 421
    r = await dash.client.get("/api/runs", headers={"Host": f"localhost:{dash.url[-5:]}"})
    assert r.status_code == 200


async def test_page_embeds_the_csrf_token_and_assets_are_local(dash: Dashboard) -> None:
    page = await dash.client.get("/")
    assert page.status_code == 200 and dash.csrf in page.text
    assert "http" not in page.text.split("<main>")[0].replace("http-equiv", "")
    assert page.headers["X-Frame-Options"] == "DENY"
    for asset in ("/static/vendor/uPlot.iife.min.js", "/static/dashboard.js"):
        assert (await dash.client.get(asset)).status_code == 200


async def test_retry_failed_by_class_applied_when_enabled(
    dash: Dashboard, db: asyncpg.Connection
) -> None:
    r = await dash.post("/api/runs/bad/retry", {"error_class": "transient"})
    assert r.status_code == 200 and r.json()["retried"] == 0
    r = await dash.post("/api/runs/bad/retry", {"error_class": "permanent"})
    assert r.status_code == 200 and r.json()["retried"] == 10
    counts = (await dash.client.get("/api/runs/bad")).json()["run"]["counts"]
    assert counts["pending"] == 10 and counts["failed"] == 0


async def test_retry_refused_when_disabled(readonly: Dashboard, db: asyncpg.Connection) -> None:
    r = await readonly.post("/api/runs/bad/retry", {"error_class": "permanent"})
    assert r.status_code == 403
    assert (await runs.counts(db, "bad")).failed_for_good == 10


async def test_retry_with_a_bad_body_names_the_field(dash: Dashboard) -> None:
    r = await dash.post("/api/runs/bad/retry", {"error_class": "nonsense"})
    assert r.status_code == 400 and "error_class" in r.json()["error"]["message"]
    r = await dash.client.post(
        "/api/runs/bad/retry",
        content=b"{not json",
        headers={"X-CSRF-Token": dash.csrf, "Content-Type": "application/json"},
    )
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


async def test_finished_runs_are_counted_once_until_a_retry_reopens_them(
    dash: Dashboard, db: asyncpg.Connection
) -> None:
    await runs.mark_finished(db, "bad")

    async def bad_counts() -> dict[str, int]:
        listed = (await dash.client.get("/api/runs")).json()["runs"]
        counts: dict[str, int] = next(r for r in listed if r["id"] == "bad")["counts"]
        return counts

    assert (await bad_counts())["failed"] == 10
    assert (await bad_counts())["failed"] == 10  # from the dashboard's memory, same answer
    assert (await dash.post("/api/runs/bad/retry", {})).json()["retried"] == 10
    assert await db.fetchval("SELECT finished_at IS NULL FROM analysis_runs WHERE id = 'bad'")
    counts = await bad_counts()
    assert counts["failed"] == 0 and counts["pending"] == 10


async def test_cost_per_run_and_target_at_the_targets_pricing(
    pool: asyncpg.Pool, db_url: str
) -> None:
    pricing = {"inputPerMillionTokens": 1000.0, "outputPerMillionTokens": 2000.0}
    priced = spec(targets=[{"name": "echo", "provider": "echo", "model": "echo-1",
                            "pricing": pricing}])  # fmt: skip
    async with pool.acquire() as db:
        await add_prompts(db, 12)
        await runs.create_run(db, "priced", priced)
        await runs.fill(db, "priced", priced)
    await drain(pool, "priced")
    async with pool.acquire() as db:
        expected = (await usage.run_usage(db, "priced")).cost
    assert expected is not None and expected > 0
    async for d in serve(db_url, allow_actions=False):
        (run,) = (await d.client.get("/api/runs")).json()["runs"]
        (target,) = (await d.client.get("/api/runs/priced/targets")).json()["targets"]
        assert run["cost"] == pytest.approx(expected)
        assert target["cost"] == pytest.approx(expected)


async def test_open_provider_batches_panel(pool: asyncpg.Pool, db_url: str) -> None:
    """A run in batch mode: items waiting inside a submitted batch, and the batch itself."""
    target = {
        "name": "b",
        "provider": "openai",
        "model": "m",
        "mode": "batch",
        "endpoint": "http://127.0.0.1:9/v1",
    }
    async with pool.acquire() as db:
        ids = await add_prompts(db, 7)
        s = spec(prompts={"ids": ids}, targets=[target])
        await runs.create_run(db, "batched", s)
        await runs.fill(db, "batched", s)
        sub, claimed = await batches.claim(
            db,
            "batched",
            "b",
            worker="w",
            limit=5,
            lease_seconds=60,
            item_lease_seconds=360,
        )
        assert sub is not None and len(claimed) == 5
        assert await batches.submitted(
            db, sub, worker="w", provider_batch_id="batch_abc", poll_in=60
        )
    async for d in serve(db_url, allow_actions=False):
        r = await d.client.get("/api/runs/batched/batches")
        assert r.status_code == 200
        body = r.json()
        assert body["summary"]["in_batches"] == 5 and body["summary"]["open_batches"] == 1
        (batch,) = body["batches"]
        assert batch["provider_batch_id"] == "batch_abc" and batch["item_count"] == 5
        assert batch["target"] == "b"

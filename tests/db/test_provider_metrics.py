"""Provider metrics derived from the database, as the operator exports them.

A run is drained by a real worker through the fake provider with 429s, permanent refusals
and latency; the collector's exposition is parsed back and checked against the rows.
"""

from __future__ import annotations

import asyncpg
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from analysisq.fake_provider.config import FakeConfig
from analysisq.fake_provider.server import FakeProvider
from analysisq.kube.metrics import Metrics
from analysisq.kube.provider_metrics import LATENCY_BOUNDS, NAMES
from analysisq.kube.ref import RunRef
from analysisq.queue import runs
from analysisq.queue.dashboard import provider_calls
from analysisq.settings import Settings
from analysisq.worker import Worker
from support import add_prompts, spec

pytestmark = [pytest.mark.db, pytest.mark.timeout(120)]

FAST = Settings(database_url="unused", poll_seconds=0.05, retry_base_seconds=0.05)
REF = RunRef("team", "nightly", "uid-1")


def samples(metrics: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = generate_latest(metrics.registry).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_provider_metrics_match_the_rows(pool: asyncpg.Pool) -> None:
    config = FakeConfig(latency_ms=30, errors={"429": 0.2, "400": 0.1}, retry_after_s=0.05)
    async with FakeProvider(config) as fake:
        target = {"name": "fake", "provider": "openai", "model": "m", "endpoint": fake.url}
        s = spec(targets=[target], maxAttempts=5)
        async with pool.acquire() as db:
            await add_prompts(db, 60)
            await runs.create_run(db, REF.run_id, s)
            await runs.fill(db, REF.run_id, s)
            run = await runs.get_run(db, REF.run_id)
        await Worker(pool, run, FAST, name="w", exit_when_done=True).run_until_stopped()

    async with pool.acquire() as db:
        calls = await provider_calls(db, REF.run_id, LATENCY_BOUNDS)
        row = await db.fetchrow(
            "SELECT count(*) AS n,"
            " count(*) FILTER (WHERE latency_ms < 250) AS fast FROM analysis_results"
        )
        deferrals = await db.fetchval("SELECT sum(deferrals) FROM analysis_queue")
        failed = await db.fetchval("SELECT count(*) FROM analysis_queue WHERE status='failed'")
    metrics = Metrics()
    metrics.providers.observe_calls(REF, calls)
    metrics.providers.observe_paused(REF, {"fake": False})
    got = samples(metrics)
    key = {("namespace", "team"), ("run", "nightly"), ("target", "fake")}

    def value(name: str, **extra: str) -> float:
        return got[(name, frozenset(key | set(extra.items())))]

    assert value("analysisq_provider_items", outcome="ok") == row["n"] > 0
    assert value("analysisq_provider_items", outcome="permanent") == failed > 0
    assert value("analysisq_provider_rate_limited_total") == deferrals > 0
    assert value("analysisq_provider_latency_seconds_count") == row["n"]
    assert value("analysisq_provider_latency_seconds_bucket", le="+Inf") == row["n"]
    assert value("analysisq_provider_latency_seconds_bucket", le="0.25") == row["fast"]
    assert value("analysisq_provider_latency_seconds_sum") > 0.03 * row["n"] * 0.5
    assert value("analysisq_target_paused") == 0
    assert {name for name, _ in got} >= {
        "analysisq_provider_items",
        "analysisq_provider_rate_limited_total",
        "analysisq_provider_latency_seconds_bucket",
        "analysisq_target_paused",
    }
    assert set(NAMES) <= {n.removesuffix("_bucket") for n, _ in got}

    metrics.forget(REF)
    assert not any(n.startswith("analysisq_provider") for n, _ in samples(metrics))

"""``analysisq demo``: a daily run of 10,000 prompts against a misbehaving fake provider.

It writes the sample prompts (``sample_prompts``) to a JSONL file and imports them like any
prompt file (inactive, so that later runs of "every active prompt" leave them out; the demo
selects them by id). It starts the fake OpenAI-compatible provider in this process on
loopback with realistic faults: lognormal latency around 150 ms, 10% transient errors (500,
503, malformed bodies), a few 429s with Retry-After (every worker then waits), and its own
rate cap a little above the rate the run is allowed. Then it ``launch``es the run exactly as
``analysisq run`` does, with real worker processes, and reports how the retries went.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
from rich.console import Console

from analysisq.db.connect import acquire
from analysisq.fake_provider.config import FakeConfig
from analysisq.fake_provider.server import FakeProvider
from analysisq.fake_provider.stats import FakeStats
from analysisq.local.launch import Launch, launch
from analysisq.local.outcome import RunOutcome
from analysisq.local.sample_prompts import generate
from analysisq.queue import runs
from analysisq.settings import Settings
from analysisq.spec import AnalysisRunSpec, parse_spec

TARGET = "fake-gpt"


def fake_config(rps: float) -> FakeConfig:
    """The demo provider: slow-ish, flaky, and rate capped 20% above what the run may send."""
    return FakeConfig(
        model="gpt-4o-mini",
        latency_ms=150,
        lognormal_sigma=0.5,
        errors={"500": 0.05, "503": 0.04, "malformed": 0.01, "429": 0.002},
        retry_after_s=1.0,
        rate_limit_rps=rps * 1.2,
        seed=7,
    )


def demo_spec(ids: list[str], endpoint: str, *, workers: int, rps: float) -> AnalysisRunSpec:
    # Five attempts: with 10% transient errors, three would leave about one item in a
    # thousand failed (0.1^3); five recover all of them but about one in 100,000.
    return parse_spec(
        {
            "prompts": {"ids": ids},
            "targets": [
                {
                    "name": TARGET,
                    "provider": "openai",
                    "model": "gpt-4o-mini",
                    "endpoint": endpoint,
                    "rateLimit": {"requestsPerSecond": rps},
                    "params": {"temperature": 0.2, "max_tokens": 300},
                    "timeoutSeconds": 10,
                }
            ],
            "workers": workers,
            "batchSize": 5,
            "maxAttempts": 5,
            "leaseSeconds": 30,
        },
        source="demo spec",
    )


def write_prompt_file(path: Path, n: int) -> Path:
    """The first *n* sample prompts as JSONL (what an import file looks like)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for prompt in generate(n):
            f.write(json.dumps(prompt.to_json(active=False), ensure_ascii=False) + "\n")
    return path


@dataclass
class DemoResult:
    outcome: RunOutcome
    fake: FakeStats


async def run_demo(
    settings: Settings,
    url: str,
    pool: asyncpg.Pool,
    out: Console,
    *,
    prompts: int,
    workers: int,
    rps: float,
    resume: str | None = None,
) -> DemoResult:
    """Start the fake provider, then run (or resume) the demo like ``analysisq run``."""
    port = 0
    if resume is not None:
        async with acquire(pool) as conn:
            run = await runs.get_run(conn, resume)
        # The stored spec points at the fake provider's old address: listen there again.
        port = httpx.URL(run.spec.target(TARGET).endpoint or "").port or 0
    async with FakeProvider(fake_config(rps), port=port) as fake:
        out.print(
            f"Fake provider at {fake.url}: ~150 ms, 10% transient errors, a few 429s, capped "
            f"at {fake.config.rate_limit_rps:g} req/s; the run may send {rps:g} req/s.",
            soft_wrap=True,
        )
        if resume is not None:
            what = Launch(resume=resume, workers=workers)
        else:
            prompt_file = settings.data_dir / "demo" / f"prompts-{prompts}.jsonl"
            write_prompt_file(prompt_file, prompts)
            ids = [p.external_id for p in generate(prompts)]
            spec = demo_spec(ids, fake.url, workers=workers, rps=rps)
            what = Launch(spec=spec, name="demo", prompts_file=prompt_file, workers=workers)
        outcome = await launch(settings, url, pool, out, what)
        return DemoResult(outcome=outcome, fake=fake.stats())


def fake_lines(stats: FakeStats) -> list[str]:
    """What the fake provider went through, in words."""
    codes = {k: v for k, v in stats.by_status.items() if k != "200"}
    faults = ", ".join(f"{v:,} × {k}" for k, v in codes.items()) or "none"
    return [
        f"The fake provider got {stats.requests:,} requests for {stats.prompts:,} prompts and "
        f"answered {stats.completions:,} of them; the rest were faults: {faults}.",
        f"Busiest second: {stats.max_requests_1s} requests; no prompt was answered twice: "
        f"{'yes' if stats.prompts_completed_more_than_once == 0 else 'NO'}.",
    ]


def next_steps(run_id: str) -> list[str]:
    return [
        "",
        f"Look around:  analysisq status {run_id}   analysisq errors {run_id}   analysisq runs",
        "",
        "Against a real provider (any OpenAI-compatible API; also anthropic and http):",
        "  export OPENAI_API_KEY=sk-...",
        "  analysisq run --prompts my-prompts.csv --target gpt=openai:gpt-4o-mini \\",
        "      --api-key-env OPENAI_API_KEY --rps 10",
        "or put the same fields in a YAML spec (see docs/configuration.md): "
        "analysisq run --spec run.yaml",
    ]

"""Small builders the tests share: prompts, specs and runs in a test database."""

from __future__ import annotations

from typing import Any

import asyncpg

from analysisq.queue import prompts, runs
from analysisq.spec import AnalysisRunSpec, parse_spec


async def add_prompts(
    conn: asyncpg.Connection,
    n: int,
    *,
    prefix: str = "p",
    tags: list[str] | None = None,
    active: bool = True,
    text: str = "What does model {i} think of prompt {i}?",
) -> list[str]:
    ids = [f"{prefix}{i:06d}" for i in range(n)]
    await prompts.upsert(
        conn,
        [
            prompts.Prompt(external_id, text.format(i=i), tuple(tags or ()), active)
            for i, external_id in enumerate(ids)
        ],
    )
    return ids


def spec(**kw: Any) -> AnalysisRunSpec:
    data: dict[str, Any] = {"targets": [{"name": "echo", "provider": "echo", "model": "echo-1"}]}
    data.update(kw)
    return parse_spec(data)


async def new_run(
    conn: asyncpg.Connection, run_id: str = "run-1", s: AnalysisRunSpec | None = None
) -> AnalysisRunSpec:
    s = s or spec()
    await runs.create_run(conn, run_id, s)
    await runs.fill(conn, run_id, s)
    return s

"""The prompts table: prompts stored once by external id and reused by every run.

``upsert`` writes a batch with the named query ``upsert_prompt`` (one statement) and says
what the database did: inserted, or updated because text, tags, active or metadata changed
(rows that did not change are neither). Reading and validating a prompt file is
``analysisq.local.prompt_file``; ``analysisq.local.prompt_import`` batches its rows here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from analysisq.db import sql
from analysisq.db.connect import translated


@dataclass(frozen=True)
class Prompt:
    """One prompt as the ``prompts`` table stores it."""

    external_id: str
    text: str
    tags: tuple[str, ...] = ()
    active: bool = True
    metadata: dict[str, Any] = field(default_factory=dict)


async def upsert(conn: asyncpg.Connection, prompts: Sequence[Prompt]) -> tuple[int, int]:
    """Insert or update *prompts* (ids unique within the batch); return (inserted, updated)."""
    if not prompts:
        return 0, 0
    with translated(f"storing {len(prompts)} prompts"):
        written = await sql.fetch(
            conn,
            "upsert_prompt",
            external_ids=[p.external_id for p in prompts],
            texts=[p.text for p in prompts],
            tags=[json.dumps(list(p.tags)) for p in prompts],
            actives=[p.active for p in prompts],
            metadata=[json.dumps(p.metadata) for p in prompts],
        )
    inserted = sum(1 for w in written if w["inserted"])
    return inserted, len(written) - inserted

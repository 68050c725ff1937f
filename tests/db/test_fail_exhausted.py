"""One place for "no attempt left": both claims end exhausted waiting items through
``fail_exhausted`` (migration 0009), also when nothing else is left to claim."""

from __future__ import annotations

import asyncpg
import pytest
from test_faults_batch import BATCH_TARGET

from analysisq.queue import batches, items, runs
from support import add_prompts, new_run, spec

pytestmark = pytest.mark.db


@pytest.mark.parametrize("path", ["sync", "batch"])
async def test_a_claim_with_only_exhausted_items_still_fails_them(
    db: asyncpg.Connection, path: str
) -> None:
    target = BATCH_TARGET if path == "batch" else {"name": "b", "provider": "echo", "model": "m"}
    await add_prompts(db, 3)
    await new_run(db, "run-1", spec(targets=[target], maxAttempts=3))
    # Released after 429s (no attempt counted for those), then maxAttempts is lowered.
    await db.execute(
        "UPDATE analysis_queue SET attempts = 2, error_class = 'rate_limited',"
        " error_message = '429 from provider'"
    )
    await runs.create_run(db, "run-1", spec(targets=[target], maxAttempts=2))
    if path == "batch":
        sub, claimed = await batches.claim(
            db, "run-1", "b", worker="w", limit=10, lease_seconds=60, item_lease_seconds=360
        )
        assert sub is None
        assert await db.fetchval("SELECT count(*) FROM batch_submissions") == 0
    else:
        claimed = await items.claim(db, "run-1", worker="w", limit=10, lease_seconds=60)
    assert claimed == []
    rows = await db.fetch("SELECT status, next_attempt_at, error_message FROM analysis_queue")
    assert {(r["status"], r["next_attempt_at"]) for r in rows} == {("failed", None)}
    assert {r["error_message"] for r in rows} == {"gave up after 2 attempts: 429 from provider"}
    assert (await runs.counts(db, "run-1")).done

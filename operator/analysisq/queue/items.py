"""Claims on items: claim, heartbeat, complete, fail, release — every write fenced.

A claim gives the worker a lease (``lease_expires_at``) and a claim token. Every later write
for that item presents the token and applies only while the item is still ``processing``
under it, so a worker whose lease was taken away (rescued, reclaimed) changes nothing: the
wrappers report which writes applied and the worker logs the rest as lost leases.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from analysisq.completion import Completion
from analysisq.db import sql
from analysisq.db.connect import translated
from analysisq.db.text import db_int, db_json, db_text
from analysisq.errors import ErrorClass, TargetFault, redact
from analysisq.queue import breaker

MAX_ERROR_CHARS = 2000
#: Longest model name stored with a result.
MAX_MODEL_CHARS = 256


@dataclass(frozen=True, slots=True)
class ClaimedItem:
    """One claim on one item: the item's id and the claim's token (the fence) identify it."""

    id: int
    token: uuid.UUID
    run_id: str
    prompt_tracking_id: int
    external_id: str
    target: str
    attempt: int
    deferrals: int
    #: The run's maxAttempts as the database said at the claim.
    max_attempts: int
    #: Leases this item lost before this claim (a worker holding it died or hung).
    lease_losses: int
    text: str

    @property
    def suspect(self) -> bool:
        """It lost a lease before: it may be what killed its worker."""
        return self.lease_losses > 0

    @property
    def key(self) -> tuple[int, uuid.UUID]:
        """The claim's identity: a re-claim of the same item is another claim."""
        return (self.id, self.token)


@dataclass(frozen=True, slots=True)
class Outcome:
    """A completed item's result, ready to be written."""

    item: ClaimedItem
    completion: Completion


async def claim(
    conn: asyncpg.Connection,
    run_id: str,
    *,
    worker: str,
    limit: int,
    lease_seconds: float,
    max_suspects: int | None = None,
    skip_targets: Sequence[str] = (),
) -> list[ClaimedItem]:
    """Lease up to *limit* due items for the sync path, at most *max_suspects* of them (None:
    any number) having lost a lease before; waiting items with no attempt left fail for good
    instead. *skip_targets* (those in mode batch) are left to ``queue.batches.claim``."""
    _, claimed = await complete_and_claim(
        conn,
        (),
        run_id,
        worker=worker,
        limit=limit,
        lease_seconds=lease_seconds,
        max_suspects=max_suspects,
        skip_targets=skip_targets,
    )
    return claimed


def claimed_item(r: asyncpg.Record) -> ClaimedItem:
    """A ``ClaimedItem`` from a row of a claim (``claim``, ``batch_claim``...)."""
    return ClaimedItem(
        id=r["id"],
        token=r["claim_token"],
        run_id=r["run_id"],
        prompt_tracking_id=r["prompt_tracking_id"],
        external_id=r["external_id"],
        target=r["target"],
        attempt=r["attempts"],
        deferrals=r["deferrals"],
        max_attempts=r["max_attempts"],
        lease_losses=r["lease_losses"],
        text=r["text"],
    )


async def heartbeat(
    conn: asyncpg.Connection,
    items: Sequence[ClaimedItem],
    lease_seconds: float,
    *,
    timeout: float | None = None,
) -> set[int]:
    """Renew the leases; return the ids still held (the others were lost)."""
    if not items:
        return set()
    with translated("renewing leases"):
        q = sql.query("heartbeat")
        args = q.args(
            ids=[i.id for i in items],
            tokens=[i.token for i in items],
            lease_seconds=float(lease_seconds),
        )
        rows = await conn.fetch(q.text, *args, timeout=timeout)
    return {r[0] for r in rows}


@functools.lru_cache(maxsize=256)
def _model_text(model: str) -> str:
    """A model name as stored: a worker sees a handful of them, once per answer each."""
    return db_text(model, MAX_MODEL_CHARS)


def _result_columns(outcomes: Sequence[Outcome]) -> dict[str, list[object]]:
    """The result parameters of ``complete_and_claim``, one array each, made storable: an
    answer is kept even when its parsed JSON or token counts cannot be."""
    return {
        "ids": [o.item.id for o in outcomes],
        "tokens": [o.item.token for o in outcomes],
        "models": [_model_text(o.completion.model) for o in outcomes],
        "response_texts": [db_text(o.completion.text) for o in outcomes],
        "parsed": [db_json(o.completion.parsed, o.completion.parsed_json) for o in outcomes],
        "tokens_in": [db_int(o.completion.tokens_in) for o in outcomes],
        "tokens_out": [db_int(o.completion.tokens_out) for o in outcomes],
        "latency_ms": [max(0.0, float(o.completion.latency_ms)) for o in outcomes],
    }


async def complete(
    conn: asyncpg.Connection, outcomes: Sequence[Outcome], *, via_batch: bool = False
) -> set[int]:
    """Write results for the claims still ours; return the ids written. *via_batch*: the
    answers came through a provider batch (recorded per result)."""
    if not outcomes:
        return set()
    written, _ = await complete_and_claim(
        conn, outcomes, "", worker="", limit=0, lease_seconds=0, via_batch=via_batch
    )
    return written


async def complete_and_claim(
    conn: asyncpg.Connection,
    outcomes: Sequence[Outcome],
    run_id: str,
    *,
    worker: str,
    limit: int,
    lease_seconds: float,
    max_suspects: int | None = None,
    skip_targets: Sequence[str] = (),
    via_batch: bool = False,
) -> tuple[set[int], list[ClaimedItem]]:
    """``complete`` then ``claim`` in one statement (one round trip, one transaction).

    Returns the ids written (as ``complete``) and the new claims (as ``claim``, up to
    *limit*, at most *max_suspects* of them having lost a lease before). Fencing and
    write-once are those of ``complete``: a result is written only for a claim still the
    writer's, and at most once per item.
    """
    if not outcomes:
        what = "claiming items"
    else:
        what = "completing and claiming items" if limit else "completing items"
    with translated(what):
        rows = await sql.fetch(
            conn,
            "complete_and_claim",
            **_result_columns(outcomes),
            via_batch=via_batch,
            run_id=run_id,
            limit=limit,
            worker=worker,
            lease_seconds=float(lease_seconds),
            max_suspects=max_suspects,
            skip_targets=list(skip_targets),
        )
    written = {r["id"] for r in rows if r["written"]}
    return written, [claimed_item(r) for r in rows if not r["written"]]


async def fail(
    conn: asyncpg.Connection,
    item: ClaimedItem,
    error_class: ErrorClass,
    message: str,
    retry_in: float | None,
    *,
    fault: TargetFault | None = None,
) -> bool:
    """Record a failure; ``retry_in`` None = failed for good. False if the lease was lost.

    A failure for good caused by a ``fault`` of the target goes through the circuit breaker
    (``breaker``), which may pause the target and give the item back instead."""
    text = db_text(redact(message, MAX_ERROR_CHARS), MAX_ERROR_CHARS)
    if fault is not None and retry_in is None:
        return await breaker.fail_on_target_fault(
            conn, item.id, item.token, item.target, error_class, text, fault
        )
    with translated(f"failing item {item.id}"):
        row = await sql.fetchval(
            conn,
            "fail",
            item_id=item.id,
            token=item.token,
            error_class=str(error_class),
            error_message=text,
            retry_in=retry_in,
        )
    return row is not None


async def release(
    conn: asyncpg.Connection,
    item: ClaimedItem,
    *,
    delay: float = 0.0,
    deferral: bool = False,
    error_class: ErrorClass | None = None,
    message: str | None = None,
    park: bool = False,
) -> bool:
    """Give the item back to the queue without counting an attempt.

    ``park`` keeps it waiting until its target is resumed (a paused target)."""
    with translated(f"releasing item {item.id}"):
        row = await sql.fetchval(
            conn,
            "release",
            item_id=item.id,
            token=item.token,
            error_class=str(error_class) if error_class else None,
            error_message=db_text(redact(message, MAX_ERROR_CHARS), MAX_ERROR_CHARS)
            if message
            else None,
            deferral=1 if deferral else 0,
            delay=float(delay),
            park=park,
        )
    return row is not None

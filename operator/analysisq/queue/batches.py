"""Provider batch submissions: the queue side of ``targets[].mode: batch``.

A submission is a row of ``batch_submissions`` with its own lease. ``claim`` records the
intent and claims its items in one statement, before anything is sent; ``submitted`` records
the provider's batch id once it accepted. ``take`` hands a worker the submissions it should
work on now (its own, when due for a poll, and anyone's whose lease expired: adoption);
``heartbeat`` renews its leases, ``touch_items`` keeps its waiting items visibly alive and
``release_leases`` hands them over when it stops.
Results are written with ``items.complete`` / ``items.fail`` / ``items.release``, fenced by
each item's claim like any sync answer; ``finish`` ends a submission and puts every item
that got no answer back unspent. The worker's batch driver (``analysisq.worker.batch``)
calls these in that order.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from analysisq.db import sql
from analysisq.db.connect import translated
from analysisq.db.text import db_text
from analysisq.errors import redact
from analysisq.queue.items import MAX_ERROR_CHARS, ClaimedItem, claimed_item
from analysisq.tokens import TokenEstimate


@dataclass(frozen=True)
class Submission:
    """A submission as ``take`` leased it to a worker."""

    id: int
    target: str
    state: str
    provider_batch_id: str | None
    item_count: int
    cancel_reason: str | None
    created_at: datetime


@dataclass(frozen=True)
class OpenBatch:
    """An open submission, for status and the live output."""

    id: int
    target: str
    state: str
    provider_batch_id: str | None
    provider_status: str | None
    item_count: int
    request_counts: Mapping[str, int]
    created_at: datetime
    submitted_at: datetime | None
    cancel_reason: str | None
    owner: str | None


@dataclass(frozen=True)
class BatchSummary:
    in_batches: int
    open_batches: int
    answered_by_batch: int
    answered: int


async def claim(
    conn: asyncpg.Connection,
    run_id: str,
    target: str,
    *,
    worker: str,
    limit: int,
    lease_seconds: float,
    item_lease_seconds: float,
) -> tuple[int | None, list[ClaimedItem]]:
    """A new submission of up to *limit* claimable items of *target*: ``(id, items)``, or
    ``(None, [])`` when nothing is claimable. The items come without their prompts: the
    sender reads those in pages (``prompt_page``), so a claim holds none of them."""
    with translated(f"claiming a batch of {target}"):
        rows = await sql.fetch(
            conn,
            "batch_claim",
            run_id=run_id,
            target=target,
            limit=limit,
            worker=worker,
            lease_seconds=float(lease_seconds),
            item_lease_seconds=float(item_lease_seconds),
        )
    if not rows:
        return None, []
    return rows[0]["submission_id"], [claimed_item(r) for r in rows]


async def take(
    conn: asyncpg.Connection, run_id: str, *, worker: str, lease_seconds: float, limit: int = 10
) -> list[Submission]:
    with translated("taking batch submissions"):
        rows = await sql.fetch(
            conn,
            "batch_take",
            run_id=run_id,
            worker=worker,
            lease_seconds=float(lease_seconds),
            limit=limit,
        )
    return [
        Submission(
            id=r["id"],
            target=r["target"],
            state=r["state"],
            provider_batch_id=r["provider_batch_id"],
            item_count=r["item_count"],
            cancel_reason=r["cancel_reason"],
            created_at=r["created_at"],
        )
        for r in rows
    ]


async def heartbeat(
    conn: asyncpg.Connection, ids: Sequence[int], *, worker: str, lease_seconds: float
) -> set[int]:
    """Renew the leases; return the submission ids still held (the others were lost)."""
    if not ids:
        return set()
    with translated("renewing batch submission leases"):
        rows = await sql.fetch(
            conn,
            "batch_heartbeat",
            ids=list(ids),
            worker=worker,
            lease_seconds=float(lease_seconds),
        )
    return {r[0] for r in rows}


async def release_leases(conn: asyncpg.Connection, ids: Sequence[int], *, worker: str) -> None:
    """A stopping worker's submissions *ids*: their leases end now (taken over at once)."""
    if not ids:
        return
    with translated("handing over batch submissions"):
        await sql.execute(conn, "batch_release_leases", ids=list(ids), worker=worker)


async def touch_items(
    conn: asyncpg.Connection, submission_id: int, *, worker: str, lease_seconds: float
) -> None:
    with translated(f"touching the items of batch submission {submission_id}"):
        await sql.execute(
            conn,
            "batch_touch_items",
            submission_id=submission_id,
            worker=worker,
            lease_seconds=float(lease_seconds),
        )


async def submitted(
    conn: asyncpg.Connection,
    submission_id: int,
    *,
    worker: str,
    provider_batch_id: str,
    poll_in: float,
) -> bool:
    """Record the provider's batch id; False if the submission is no longer ours."""
    with translated(f"recording batch submission {submission_id}"):
        row = await sql.fetchval(
            conn,
            "batch_submitted",
            submission_id=submission_id,
            worker=worker,
            provider_batch_id=provider_batch_id,
            poll_in=float(poll_in),
        )
    return row is not None


async def polled(
    conn: asyncpg.Connection,
    submission_id: int,
    *,
    worker: str,
    status: str,
    counts: Mapping[str, int],
    poll_in: float,
) -> bool:
    with translated(f"recording a poll of batch submission {submission_id}"):
        row = await sql.fetchval(
            conn,
            "batch_polled",
            submission_id=submission_id,
            worker=worker,
            provider_status=db_text(status, MAX_ERROR_CHARS),
            request_counts=json.dumps(dict(counts)),
            poll_in=float(poll_in),
        )
    return row is not None


async def waiting_items(conn: asyncpg.Connection, submission_id: int) -> list[ClaimedItem]:
    """The items still waiting in the submission, without their prompts (``prompt_page``)."""
    with translated(f"reading the items of batch submission {submission_id}"):
        rows = await sql.fetch(conn, "batch_items", submission_id=submission_id)
    return [claimed_item(r) for r in rows]


async def prompt_page(
    conn: asyncpg.Connection, submission_id: int, ids: Sequence[int], *, max_bytes: int
) -> list[tuple[int, str | None]]:
    """``(id, prompt)`` of those of items *ids* still waiting in the submission, in id
    order; the prompt is ``None`` past *max_bytes* bytes of prompts (the first never is)."""
    with translated(f"reading the prompts of batch submission {submission_id}"):
        rows = await sql.fetch(
            conn,
            "batch_prompt_page",
            ids=list(ids),
            submission_id=submission_id,
            max_bytes=max_bytes,
        )
    return [(r["id"], r["text"]) for r in rows]


async def spill(
    conn: asyncpg.Connection, submission_id: int, spilled: Sequence[ClaimedItem]
) -> int:
    """Put *spilled* (claimed, not sent: they did not fit the batch) back unspent, in one
    statement; how many were still held (fenced by each item's claim, as ``items.release``)."""
    if not spilled:
        return 0
    with translated(f"releasing the items that did not fit batch submission {submission_id}"):
        rows = await sql.fetch(
            conn,
            "batch_spill",
            ids=[i.id for i in spilled],
            tokens=[i.token for i in spilled],
        )
    return len(rows)


@dataclass(frozen=True)
class Finished:
    """A submission ``finish`` ended: items put back, and its budget reservation to release."""

    released: int
    reserved: TokenEstimate | None


async def finish(
    conn: asyncpg.Connection,
    submission_id: int,
    *,
    worker: str,
    outcome: str,
    release_in: float = 0.0,
    reason: str | None = None,
) -> Finished | None:
    """End the submission; items without an answer go back unspent after *release_in*
    seconds. ``None`` if the submission is no longer ours."""
    with translated(f"finishing batch submission {submission_id}"):
        row = await sql.fetchrow(
            conn,
            "batch_finish",
            submission_id=submission_id,
            worker=worker,
            outcome=db_text(redact(outcome, MAX_ERROR_CHARS), MAX_ERROR_CHARS),
            release_in=float(release_in),
            reason=db_text(redact(reason, MAX_ERROR_CHARS), MAX_ERROR_CHARS) if reason else None,
        )
    if not row or not row["finished"]:
        return None
    reserved = None
    if row["reserved_tokens_in"] is not None:
        reserved = TokenEstimate(row["reserved_tokens_in"], row["reserved_tokens_out"])
    return Finished(int(row["released"]), reserved)


async def reservation_needed(conn: asyncpg.Connection, submission_id: int, *, worker: str) -> bool:
    """Whether the intent still needs its budget reservation (its row locked until commit)."""
    with translated(f"reading the budget reservation of batch submission {submission_id}"):
        return bool(
            await sql.fetchval(
                conn, "batch_reservation", submission_id=submission_id, worker=worker
            )
        )


async def sending(
    conn: asyncpg.Connection, submission_id: int, *, worker: str, item_count: int
) -> bool:
    """Record that the submission is sent with *item_count* requests, right before its POST;
    False if it is no longer ours (then it must not be sent)."""
    with translated(f"recording the size of batch submission {submission_id}"):
        row = await sql.fetchval(
            conn,
            "batch_sending",
            submission_id=submission_id,
            worker=worker,
            item_count=item_count,
        )
    return row is not None


async def record_reservation(
    conn: asyncpg.Connection, submission_id: int, *, worker: str, reserved: TokenEstimate
) -> None:
    with translated(f"recording the budget reservation of batch submission {submission_id}"):
        await sql.execute(
            conn,
            "batch_reserved",
            submission_id=submission_id,
            worker=worker,
            tokens_in=reserved.input,
            tokens_out=reserved.output,
        )


async def cancel_open(
    conn: asyncpg.Connection, run_id: str, reason: str, target: str | None = None
) -> int:
    """Ask for the run's open submissions to be cancelled (suspend, delete, deadline)."""
    with translated(f"cancelling the open batches of run {run_id}"):
        return int(
            await sql.fetchval(
                conn, "batch_cancel_open", run_id=run_id, target=target, reason=reason
            )
        )


async def known_ids(conn: asyncpg.Connection, run_id: str, target: str) -> set[str]:
    with translated("reading known provider batches"):
        rows = await sql.fetch(conn, "batch_known_ids", run_id=run_id, target=target)
    return {r[0] for r in rows}


async def open_batches(conn: asyncpg.Connection, run_id: str) -> list[OpenBatch]:
    with translated(f"reading the open batches of run {run_id}"):
        rows = await sql.fetch(conn, "batch_open", run_id=run_id)
    return [
        OpenBatch(
            id=r["id"],
            target=r["target"],
            state=r["state"],
            provider_batch_id=r["provider_batch_id"],
            provider_status=r["provider_status"],
            item_count=r["item_count"],
            request_counts=json.loads(r["request_counts"]),
            created_at=r["created_at"],
            submitted_at=r["submitted_at"],
            cancel_reason=r["cancel_reason"],
            owner=r["lease_owner"],
        )
        for r in rows
    ]


async def summary(conn: asyncpg.Connection, run_id: str) -> BatchSummary:
    with translated(f"reading the batch summary of run {run_id}"):
        r = await sql.fetchrow(conn, "batch_summary", run_id=run_id)
    assert r is not None  # an aggregate: always one row
    return BatchSummary(r["in_batches"], r["open_batches"], r["answered_by_batch"], r["answered"])

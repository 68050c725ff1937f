"""Completed answers on their way to the database: buffered, then written in batches.

The worker adds each answer to the ``ResultBuffer``; a flush writes the whole buffer with one
fenced statement (``items.complete_and_claim``), which also claims the slots the batch frees
(``Refill``): one round trip and one transaction per batch, where a write and a claim took two.
When the database is away the batch goes back into the
buffer (the leases are still renewed). When the database refuses the batch, the answers are
written one by one so that one bad value cannot sink its batch-mates; an answer refused alone
is written once more with only its text (parsed JSON and token counts NULL), and only an
answer refused even so comes back as ``refused`` with the database's reason, for the worker
to fail.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import asyncpg

from analysisq.db.connect import acquire
from analysisq.errors import DatabaseError, DatabaseTransient
from analysisq.queue import items
from analysisq.queue.items import ClaimedItem, Outcome


@dataclass
class WriteReport:
    #: Outcomes written (their item is completed with this result).
    written: list[Outcome] = field(default_factory=list)
    #: Outcomes whose claim was no longer ours: the write was fenced off.
    fenced: list[Outcome] = field(default_factory=list)
    #: Outcomes the database refused, with its reason.
    refused: list[tuple[Outcome, str]] = field(default_factory=list)
    #: Outcomes not written because the database was away (back in the buffer).
    kept: list[Outcome] = field(default_factory=list)
    #: Why the database was away, when it was.
    unavailable: str | None = None
    #: The claims the statement made along with the batch (``Refill``), for the worker to
    #: start once it has forgotten the written ones: it never holds more than it may.
    claimed: list[ClaimedItem] = field(default_factory=list)


@dataclass(frozen=True)
class Refill:
    """The claim a flush makes in its statement (``items.claim``'s parameters)."""

    run_id: str
    worker: str
    lease_seconds: float
    #: How many items to claim along with this batch (the slots it frees; 0 = none) and the
    #: targets to skip (``worker.claim_targets``).
    places: Callable[[list[Outcome]], tuple[int, Sequence[str]]]
    #: How many of them may be suspects (items that lost a lease before; None = any).
    max_suspects: Callable[[list[Outcome]], int | None]


class ResultBuffer:
    """Answers not yet written, in arrival order; *refill* claims along with each write."""

    def __init__(self, batch_size: int, refill: Refill | None = None) -> None:
        self.batch_size = batch_size
        self.refill = refill
        self._pending: list[Outcome] = []

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, outcome: Outcome) -> bool:
        """Buffer *outcome*; True when a full batch is waiting (flush now)."""
        self._pending.append(outcome)
        return len(self._pending) >= self.batch_size

    def holds(self, item: ClaimedItem) -> bool:
        return any(o.item.key == item.key for o in self._pending)

    def drop(self, item: ClaimedItem) -> None:
        """Forget the answer of a claim that was lost: it must not be written."""
        self._pending = [o for o in self._pending if o.item.key != item.key]

    def take(self) -> list[Outcome]:
        batch, self._pending = self._pending, []
        return batch

    def put_back(self, batch: list[Outcome]) -> None:
        self._pending = batch + self._pending

    async def write(self, pool: asyncpg.Pool, batch: list[Outcome]) -> WriteReport:
        """Write *batch* (taken from this buffer); unwritten answers go back into it."""
        report = WriteReport()
        try:
            async with acquire(pool) as conn:
                done, report.claimed = await self._complete(conn, batch)
        except DatabaseTransient as exc:
            self.put_back(batch)
            report.kept, report.unavailable = batch, exc.message
            return report
        except DatabaseError:
            # A value the database refuses must not sink the whole batch: one by one.
            return await self._one_by_one(pool, batch)
        for o in batch:
            (report.written if o.item.id in done else report.fenced).append(o)
        return report

    async def _complete(
        self, conn: asyncpg.Connection, batch: list[Outcome]
    ) -> tuple[set[int], list[ClaimedItem]]:
        """The batch's one fenced statement, claiming the places it frees; the ids written
        and the new claims."""
        r = self.refill
        slots, skip = r.places(batch) if r is not None else (0, ())
        if r is None or slots <= 0:
            return await items.complete(conn, batch), []
        done, claimed = await items.complete_and_claim(
            conn,
            batch,
            r.run_id,
            worker=r.worker,
            limit=slots,
            lease_seconds=r.lease_seconds,
            max_suspects=r.max_suspects(batch),
            skip_targets=skip,
        )
        return done, claimed

    async def _one_by_one(self, pool: asyncpg.Pool, batch: list[Outcome]) -> WriteReport:
        report = WriteReport()
        for o in batch:
            try:
                async with acquire(pool) as conn:
                    done = await items.complete(conn, [o])
            except DatabaseTransient as exc:
                self.put_back([o])
                report.kept.append(o)
                report.unavailable = exc.message
                continue
            except DatabaseError as exc:
                bare = await self._text_only(pool, o, exc.message, report)
                if bare is None:
                    continue
                done = bare
            (report.written if o.item.id in done else report.fenced).append(o)
        return report

    async def _text_only(
        self, pool: asyncpg.Pool, o: Outcome, reason: str, report: WriteReport
    ) -> set[int] | None:
        """Write *o* without what the database may not take; None when it is refused."""
        bare = replace(o.completion, parsed=None, parsed_json=None, tokens_in=None, tokens_out=None)
        try:
            async with acquire(pool) as conn:
                return await items.complete(conn, [Outcome(o.item, bare)])
        except DatabaseTransient as exc:
            self.put_back([o])
            report.kept.append(o)
            report.unavailable = exc.message
        except DatabaseError:
            report.refused.append((o, reason))
        return None

"""In-flight state: one record per claim the worker holds, keyed by the claim.

A claim is an item id plus the claim token the database handed out with it. The rescuer can
take an item from a worker that stalled and the same worker can claim it again; that is a new
claim with a new token, and everything here checks the token, so the stale claim's late
bookkeeping (its refused write, its cancelled task) can never remove the new one.
``add`` returns the stale record it replaced so the caller cancels its task.

A held claim is not always running: the worker holds up to one batch beyond ``batchSize``
(prefetch), claimed while the last batch is written, so that no attempt waits for the
database. ``queue`` puts a new claim in line, ``next_ready`` hands out the next one still
held, ``waiting`` lists those not started, and ``started`` / ``ended`` count the attempts
running, which ``batchSize`` bounds.

Next: ``attempt`` (one attempt of a claim), ``results`` (buffered completions), ``loops``.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from analysisq.queue.items import ClaimedItem


@dataclass(slots=True)
class InFlightClaim:
    item: ClaimedItem
    #: The task running the attempt (None once it is done or before it starts).
    task: asyncio.Task[None] | None = None
    #: A final write (complete, fail, release) is under way: a heartbeat that does not renew
    #: this claim has not lost it.
    finishing: bool = False
    #: Its attempt runs (counted against ``batchSize``); False before it starts and after.
    running: bool = False


class InFlight:
    """The claims a worker holds: at most one per item, the newest."""

    def __init__(self) -> None:
        self._by_id: dict[int, InFlightClaim] = {}
        self._ready: deque[InFlightClaim] = deque()
        #: Claims whose attempt runs now.
        self.running = 0

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[InFlightClaim]:
        return iter(list(self._by_id.values()))

    def add(self, item: ClaimedItem) -> tuple[InFlightClaim, InFlightClaim | None]:
        """Record a new claim; return it and the stale claim on the same item it replaced."""
        stale = self._by_id.get(item.id)
        record = InFlightClaim(item)
        self._by_id[item.id] = record
        return record, (stale if stale is not None and stale.item.key != item.key else None)

    def queue(self, record: InFlightClaim) -> None:
        """Put a new claim in line for an attempt."""
        self._ready.append(record)

    def next_ready(self) -> InFlightClaim | None:
        """The oldest claim in line that is still held and not started, or None."""
        while self._ready:
            record = self._ready.popleft()
            if self.get(record.item) is record and record.task is None:
                return record
        return None

    def waiting(self) -> list[InFlightClaim]:
        """The claims held whose attempt has not started (prefetched)."""
        return [r for r in self._by_id.values() if r.task is None]

    def started(self, record: InFlightClaim) -> None:
        record.running = True
        self.running += 1

    def ended(self, record: InFlightClaim) -> bool:
        """The attempt of *record* is over; True the first time (a slot is free)."""
        if not record.running:
            return False
        record.running = False
        self.running -= 1
        return True

    def get(self, item: ClaimedItem) -> InFlightClaim | None:
        """The record of exactly this claim, or None if it is no longer held."""
        record = self._by_id.get(item.id)
        if record is None or (record.item is not item and record.item.key != item.key):
            return None
        return record

    def holds(self, item: ClaimedItem) -> bool:
        return self.get(item) is not None

    def forget(self, item: ClaimedItem) -> bool:
        """Drop this claim's record (never a newer claim's); True if it was held."""
        if self.get(item) is None:
            return False
        del self._by_id[item.id]
        return True

    def holds_suspect(self) -> bool:
        """A claim on an item that lost a lease before is held (a worker takes one at most)."""
        return any(r.item.suspect for r in self._by_id.values())

    def items(self) -> list[ClaimedItem]:
        return [r.item for r in self._by_id.values()]

    def tasks(self) -> list[asyncio.Task[None]]:
        return [r.task for r in self._by_id.values() if r.task is not None and not r.task.done()]

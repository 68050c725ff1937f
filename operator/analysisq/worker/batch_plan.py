"""What the batch driver sends, and which targets it owns: rules, no database or network.

A ``Plan`` fits claimed items, one prompt at a time, into the input of one provider batch
within ``batch.maxBytes`` and the API's own ceiling (OpenAI's 200 MB file), so a larger
input is split over several batches, never refused by the provider (the rest spill back
unspent; a prompt that can never be sent is refused on its own). Each entry that fits is
written to the batch's spooled input at once: no prompt is kept after it was added, so
fitting 50,000 prompts holds none of them. ``sync_targets_skipped`` names the
targets the sync claim leaves to the batch driver, until the run's deadline is near and the
sync path takes over.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from analysisq.errors import InvalidInput
from analysisq.providers.batch import BatchClient, BatchEntry, BatchInput, custom_id
from analysisq.queue.items import ClaimedItem
from analysisq.spec import AnalysisRunSpec, Target
from analysisq.tokens import TokenEstimate, estimate

#: Batches still open this long before the run's deadline are cancelled; the sync path
#: finishes their items.
DEADLINE_MARGIN = timedelta(minutes=30)


class Plan:
    """One batch as it is fitted, prompt by prompt (``add``): the entries that fit are
    written to *body* (the batch's input, spooled), their items kept in the same order (with
    their token estimates if *estimating*: for the run's budget); the items that did not fit
    (``spill``) and those refused outright (``refused``) are kept without their prompts."""

    def __init__(
        self, client: BatchClient, target: Target, body: BatchInput, *, estimating: bool = False
    ) -> None:
        self.target = target
        self.body = body
        self.limit = min(target.batch.max_bytes, client.max_input_bytes)
        self.bound = f"batch.maxBytes {self.limit}"
        if self.limit < target.batch.max_bytes:
            self.bound = f"{self.limit} bytes, the provider's ceiling"
        self.estimating = estimating
        self.sent: list[ClaimedItem] = []
        self.estimates: list[TokenEstimate] = []
        self.spill: list[ClaimedItem] = []
        self.refused: list[tuple[ClaimedItem, InvalidInput]] = []

    def add(self, item: ClaimedItem, text: str) -> None:
        """Fit *item*, whose prompt is *text* (see the module docstring)."""
        try:
            data = self.body.encode(BatchEntry(custom_id(item.id, item.token), text))
        except InvalidInput as exc:
            self.refused.append((item, exc))
            return
        grows = len(data)
        if grows > self.limit:
            message = f"the request is {grows} bytes, more than one batch may hold ({self.bound})"
            self.refused.append((item, InvalidInput(message)))
        elif self.body.size + grows > self.limit:
            self.spill.append(item)
        else:
            self.body.write(data)
            self.sent.append(item)
            if self.estimating:
                self.estimates.append(estimate(self.target, text))

    def cut(self, n: int) -> None:
        """Send the first *n* entries only (what the budget covers)."""
        self.body.cut(n)
        del self.sent[n:], self.estimates[n:]


def batch_targets(spec: AnalysisRunSpec) -> list[Target]:
    return [t for t in spec.targets if t.mode == "batch"]


def sync_targets_skipped(spec: AnalysisRunSpec, now: datetime | None = None) -> list[str]:
    """Targets the sync claim must leave to the batch driver: every ``mode: batch`` target,
    until the run's deadline is near (then the sync path finishes them)."""
    if spec.deadline is not None and past_margin(spec, now or datetime.now(UTC)):
        return []
    return [t.name for t in batch_targets(spec)]


def past_margin(spec: AnalysisRunSpec, now: datetime) -> bool:
    deadline = spec.deadline
    if deadline is None:
        return False
    if deadline.tzinfo is None:
        deadline = deadline.replace(tzinfo=UTC)
    return now >= deadline - DEADLINE_MARGIN

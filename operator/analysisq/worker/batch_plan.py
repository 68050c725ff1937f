"""What the batch driver sends, and which targets it owns: pure rules, no I/O.

``fit`` turns claimed items into the entries of one provider batch within
``batch.maxBytes`` and the API's own ceiling (OpenAI's 200 MB file), so a larger input is
split over several batches, never refused by the provider (the rest spill back unspent; a
prompt that can never be sent is refused on its own); ``sync_targets_skipped`` names the
targets the sync claim leaves to the batch driver, until the run's deadline is near and the
sync path takes over.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from analysisq.errors import InvalidInput
from analysisq.providers.batch import BatchClient, BatchEntry, custom_id
from analysisq.queue.items import ClaimedItem
from analysisq.spec import AnalysisRunSpec, Target

#: Batches still open this long before the run's deadline are cancelled; the sync path
#: finishes their items.
DEADLINE_MARGIN = timedelta(minutes=30)


@dataclass
class Plan:
    """One batch's entries (and their items, in the same order), the items that did not
    fit, and the items refused outright."""

    entries: list[BatchEntry] = field(default_factory=list)
    sent: list[ClaimedItem] = field(default_factory=list)
    spill: list[ClaimedItem] = field(default_factory=list)
    refused: list[tuple[ClaimedItem, InvalidInput]] = field(default_factory=list)


def fit(client: BatchClient, target: Target, claimed: list[ClaimedItem]) -> Plan:
    """The entries of *claimed* that fit one batch of *target* (see the module docstring)."""
    plan = Plan()
    limit = min(target.batch.max_bytes, client.max_input_bytes)
    bound = f"batch.maxBytes {limit}"
    if limit < target.batch.max_bytes:
        bound = f"{limit} bytes, the provider's ceiling"
    size = 0
    for item in claimed:
        entry = BatchEntry(custom_id(item.id, item.token), item.text)
        try:
            grows = client.entry_size(entry)
        except InvalidInput as exc:
            plan.refused.append((item, exc))
            continue
        if grows > limit:
            message = f"the request is {grows} bytes, more than one batch may hold ({bound})"
            plan.refused.append((item, InvalidInput(message)))
        elif size + grows > limit:
            plan.spill.append(item)
        else:
            size += grows
            plan.entries.append(entry)
            plan.sent.append(item)
    return plan


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

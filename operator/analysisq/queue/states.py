"""The item state vocabulary, shared with the ``queue_status`` domain in the schema.

See docs/states.md for the diagram. ``failed`` covers both "will be retried" (a next attempt
time is set) and "failed for good" (no next attempt); ``Counts`` reports them apart.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any


class ItemStatus(StrEnum):
    PENDING = "pending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"


@dataclass(frozen=True)
class Counts:
    """Items of a run by state; ``failed`` = gave up for good, ``retrying`` = will retry."""

    total: int = 0
    pending: int = 0
    processing: int = 0
    completed: int = 0
    failed: int = 0
    retrying: int = 0
    stuck: int = 0

    @property
    def terminal(self) -> int:
        return self.completed + self.failed

    @property
    def done(self) -> bool:
        """Every item is completed or failed for good."""
        return self.terminal == self.total

    @property
    def failed_ratio(self) -> float:
        """The share of items that failed for good (0 for an empty run)."""
        return self.failed / self.total if self.total else 0.0

    def failed_too_often(self, max_failed_ratio: float) -> bool:
        """More items failed for good than the run allows (``maxFailedRatio``): the verdict
        of a finished run is Failed. The one rule, for the operator, ``analysisq run``'s exit
        code and the dashboard."""
        return self.failed_ratio > max_failed_ratio

    @property
    def progress(self) -> float:
        return 1.0 if self.total == 0 else self.terminal / self.total

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

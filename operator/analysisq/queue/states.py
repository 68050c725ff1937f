"""The item state vocabulary, shared with the ``queue_status`` domain in the schema.

See docs/states.md for the diagram. The status ``failed`` covers both "will be retried" (a
next attempt time is set) and "failed for good" (no next attempt); ``Counts`` reports them
apart, as ``retrying`` and ``failed_for_good``. Outside Python (the SQL columns, an
AnalysisRun's ``status.counts``, ``--json``) the second is named ``failed``, as the seed's
runbook queries name it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from enum import StrEnum
from typing import Any


class ItemStatus(StrEnum):
    PENDING = "pending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"


@dataclass(frozen=True)
class Counts:
    """Items of a run by state; ``failed_for_good`` = gave up, ``retrying`` = will retry."""

    total: int = 0
    pending: int = 0
    processing: int = 0
    completed: int = 0
    failed_for_good: int = 0
    retrying: int = 0
    stuck: int = 0

    @property
    def terminal(self) -> int:
        return self.completed + self.failed_for_good

    @property
    def done(self) -> bool:
        """Every item is completed or failed for good."""
        return self.terminal == self.total

    @property
    def failed_ratio(self) -> float:
        """The share of items that failed for good (0 for an empty run)."""
        return self.failed_for_good / self.total if self.total else 0.0

    def failed_too_often(self, max_failed_ratio: float) -> bool:
        """More items failed for good than the run allows (``maxFailedRatio``): the verdict
        of a finished run is Failed. The one rule, for the operator, ``analysisq run``'s exit
        code and the dashboard."""
        return self.failed_ratio > max_failed_ratio

    @property
    def progress(self) -> float:
        return 1.0 if self.total == 0 else self.terminal / self.total

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Counts:
        """The counts of a query row (columns named as ``as_dict`` names them)."""
        return cls(**{name: row[outside] for name, outside in _OUTSIDE_NAMES.items()})

    def as_dict(self) -> dict[str, Any]:
        """The counts under their names outside Python (``failed`` for ``failed_for_good``)."""
        return {_OUTSIDE_NAMES[f.name]: getattr(self, f.name) for f in fields(self)}


#: Field name -> the name in SQL rows, status and JSON.
_OUTSIDE_NAMES = {f.name: f.name for f in fields(Counts)} | {"failed_for_good": "failed"}

"""What a ``RunService`` method returns and how it is worded: the ``Report``.

A report is the status fields to patch and the Events (``Note``) to post; the handlers write
it. The rules decide *what* happened (``kube.service``); this module says it: the Events of a
fill, a rescale, a stuck reset, a transition (a paused target, an exhausted budget, a new
``Degraded`` reason), and the ``Degraded`` report of an error, whose reason is the error's
own (``AnalysisqError.reason``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from analysisq.errors import AnalysisqError
from analysisq.kube.deployment import RESUME_ANNOTATION
from analysisq.kube.status import (
    BUDGET_EXHAUSTED,
    DEGRADED,
    PAUSED,
    PAUSED_CONDITION,
    PENDING,
    PausedTarget,
    Problem,
    changed,
    degraded,
    get_condition,
    timestamp,
)

Status = Mapping[str, Any]

#: Prompt ids named in the PromptsMissing Event; the rest are counted.
_SHOWN_IDS = 10


@dataclass(frozen=True)
class Note:
    """An Event to post on the AnalysisRun."""

    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass
class Report:
    status: dict[str, Any] = field(default_factory=dict)
    notes: list[Note] = field(default_factory=list)


def problem_of(exc: AnalysisqError) -> Problem:
    """The ``Degraded`` reason and message for an error."""
    return Problem(exc.reason, exc.message)


def _newly_degraded(old: Mapping[str, Any] | None, reason: str | None) -> bool:
    """``Degraded`` was not true before, or was true for another reason."""
    return old is None or old.get("status") != "True" or old.get("reason") != reason


def degraded_report(status: Status, problem: Problem) -> Report:
    """Status and Event for a problem; the Event only when the reason is new."""
    old = get_condition(status, DEGRADED)
    conditions = degraded(status.get("conditions") or [], [problem])
    patch: dict[str, Any] = {"conditions": conditions, "message": problem.message}
    if not status.get("phase"):
        patch["phase"] = PENDING
    fresh = _newly_degraded(old, problem.reason)
    notes = [Note("Warning", problem.reason, problem.message)] if fresh else []
    return Report(changed(status, patch), notes)


def missing_prompts_note(missing_ids: Sequence[str]) -> Note:
    """Selected prompt ids that are not in the database (the fill skipped them)."""
    shown = ", ".join(missing_ids[:_SHOWN_IDS])
    more = len(missing_ids) - _SHOWN_IDS
    return Note(
        "Warning",
        "PromptsMissing",
        f"{len(missing_ids)} selected prompt ids do not exist: {shown}"
        + (f" and {more} more" if more > 0 else ""),
    )


def filled_notes(message: str, total: int) -> list[Note]:
    """The Events of a run whose queue was just filled with *total* items."""
    notes = [Note("Normal", "Filled", message)]
    if total == 0:
        notes.append(Note("Warning", "NothingSelected", "the prompt selection matched nothing"))
    return notes


def scale_note(suspend: bool, was_suspended: bool, replicas: int) -> Note:
    """The Event of a rescale: suspended, resumed, or scaled."""
    if suspend and not was_suspended:
        return Note("Normal", "Suspended", "workers scaled to 0; the queue is kept")
    if was_suspended and not suspend:
        return Note("Normal", "Resumed", f"workers scaled to {replicas}")
    return Note("Normal", "Scaled", f"workers scaled to {replicas}")


def stuck_reset_report(reset: int, poisoned: int) -> Report:
    """``lastStuckReset`` and, when something was reset, its Event."""
    report = Report({"lastStuckReset": {"time": timestamp(), "count": reset, "poisoned": poisoned}})
    if reset or poisoned:
        report.notes.append(
            Note(
                "Warning",
                "StuckItemsReset",
                f"reset {reset} stuck items; {poisoned} failed for good "
                "after losing their lease too often",
            )
        )
    return report


def transition_notes(
    old: Status, new: Mapping[str, Any], paused: Sequence[PausedTarget]
) -> list[Note]:
    """Events for what just became true: a paused target, a new degraded reason."""
    notes: list[Note] = []
    before = {t.get("name") for t in old.get("pausedTargets") or []}
    for target in paused:
        if target.name not in before:
            fix = "the setting named" if target.by_fault else "its API key"
            notes.append(
                Note(
                    "Warning",
                    "TargetPaused",
                    f"target {target.name} paused for the run: {target.reason}; fix {fix} and "
                    f"set the annotation {RESUME_ANNOTATION} to resume it",
                )
            )
    if new.get("phase") == PAUSED and old.get("phase") != PAUSED:
        cond = get_condition(new, PAUSED_CONDITION) or {}
        notes.append(Note("Warning", BUDGET_EXHAUSTED, str(cond.get("message", ""))))
    now = get_condition(new, DEGRADED)
    fresh = _newly_degraded(get_condition(old, DEGRADED), (now or {}).get("reason"))
    if now and now["status"] == "True" and now["reason"] != "TargetPaused" and fresh:
        notes.append(Note("Warning", now["reason"], now["message"]))
    return notes

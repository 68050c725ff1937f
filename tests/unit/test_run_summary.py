"""The summary of ``analysisq run``: what a person reads when the run is over."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from analysisq.local.outcome import Ending, RunOutcome, summary
from analysisq.queue.batches import BatchSummary
from analysisq.queue.runs import Run
from analysisq.queue.states import Counts
from analysisq.spec import parse_spec

pytestmark = pytest.mark.unit

TARGET = {"name": "cheap", "provider": "openai", "model": "m", "mode": "batch"}


def outcome(ending: Ending, counts: Counts, batches: BatchSummary) -> RunOutcome:
    now = datetime.now(UTC)
    run = Run("r1", "r1", parse_spec({"targets": [TARGET]}), now, None, now)
    return RunOutcome(run, ending, counts, elapsed=60.0, batches=batches)


def test_the_summary_reports_the_share_answered_through_batches() -> None:
    done = outcome(Ending.FINISHED, Counts(total=400, completed=400),
                   BatchSummary(in_batches=0, open_batches=0, answered_by_batch=300,
                                answered=400))  # fmt: skip
    lines = summary(done)
    assert (
        "Provider batches: 300 of 400 answers (75.0%) came through a batch (priced at the "
        "batch discount)." in lines
    )
    assert not any("still wait" in line for line in lines)


def test_an_interrupted_batch_run_says_where_its_open_batches_go() -> None:
    stopped = outcome(Ending.INTERRUPTED, Counts(total=400, completed=100, processing=300),
                      BatchSummary(in_batches=300, open_batches=2, answered_by_batch=100,
                                   answered=100))  # fmt: skip
    lines = summary(stopped)
    assert (
        "300 items still wait in 2 open provider batches; their answers are ingested when "
        "the run continues: analysisq run --resume r1" in lines
    )

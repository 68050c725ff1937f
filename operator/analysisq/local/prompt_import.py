"""Store a prompt file: every valid row upserted by external id, in batches.

``prompt_file`` decides which rows are valid; this module hands them in batches to
``analysisq.queue.prompts.upsert`` (one statement per batch) and counts what the database
did: inserted, updated (text, tags, active or metadata changed) or unchanged. Rejected rows
are collected with their line numbers; storing the valid rows never depends on the invalid
ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from analysisq.local.prompt_file import PromptFile, PromptRow, Rejection
from analysisq.queue import prompts

#: Rejected rows listed for a person; the rest are counted (``to_json`` lists them all).
SHOWN_REJECTIONS = 50


@dataclass
class ImportReport:
    """What an import did."""

    path: str
    format: str
    #: Rows that passed validation (all of them stored unless ``dry_run``).
    valid: int = 0
    inserted: int = 0
    updated: int = 0
    rejected: list[Rejection] = field(default_factory=list)
    ignored_columns: list[str] = field(default_factory=list)
    dry_run: bool = False

    @property
    def unchanged(self) -> int:
        return 0 if self.dry_run else self.valid - self.inserted - self.updated

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "format": self.format,
            "dry_run": self.dry_run,
            "valid": self.valid,
            "inserted": self.inserted,
            "updated": self.updated,
            "unchanged": self.unchanged,
            "rejected": [
                {"line": r.line, "id": r.external_id, "reason": r.reason} for r in self.rejected
            ],
            "ignored_columns": self.ignored_columns,
        }

    def lines(self, shown: int = SHOWN_REJECTIONS) -> list[str]:
        """The report for a person: the first *shown* rejected rows, then the counts."""
        out = [f"rejected {r}" for r in self.rejected[:shown]]
        if len(self.rejected) > shown:
            out.append(
                f"... and {len(self.rejected) - shown:,} more rejected rows (--json lists all)"
            )
        if self.ignored_columns:
            out.append(f"ignored columns: {', '.join(self.ignored_columns)}")
        return [*out, self.summary()]

    def summary(self) -> str:
        if self.dry_run:
            stored = f"{self.valid:,} valid (dry run: nothing stored)"
        else:
            stored = (
                f"{self.inserted:,} inserted, {self.updated:,} updated, "
                f"{self.unchanged:,} unchanged"
            )
        return f"{self.path}: {stored}, {len(self.rejected):,} rejected"


async def import_prompts(
    conn: asyncpg.Connection,
    path: Path,
    *,
    max_chars: int,
    batch_size: int = 1000,
    fmt: str | None = None,
    dry_run: bool = False,
) -> ImportReport:
    """Validate every row of *path* and store the valid ones (unless *dry_run*)."""
    source = PromptFile(path, max_chars=max_chars, fmt=fmt)
    report = ImportReport(path=str(path), format=source.format, dry_run=dry_run)
    batch: list[PromptRow] = []

    async def flush() -> None:
        report.valid += len(batch)
        if not dry_run:
            inserted, updated = await prompts.upsert(conn, batch)
            report.inserted += inserted
            report.updated += updated
        batch.clear()

    for record in source:
        if isinstance(record, Rejection):
            report.rejected.append(record)
            continue
        batch.append(record)
        if len(batch) >= batch_size:
            await flush()
    await flush()
    report.ignored_columns = source.ignored_columns
    return report

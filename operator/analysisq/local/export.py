"""Write a run's results to a JSONL or CSV file, by keyset paging over ``results_page``.

One row per completed item (the database holds one result per item), with its cost at the
target's pricing (empty without one; an answer through a provider batch, ``via_batch``, at
the batch discount). The file is written
beside its final name and renamed when complete, so a reader never sees half a file.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Literal

import asyncpg

from analysisq.errors import InputError
from analysisq.queue import monitor

ResultFormat = Literal["jsonl", "csv"]
PAGE_SIZE = 1000
COLUMNS = (
    "prompt_id",
    "target",
    "model",
    "response_text",
    "parsed",
    "tokens_in",
    "tokens_out",
    "cost",
    "via_batch",
    "latency_ms",
    "attempt",
    "queue_id",
    "created_at",
)


def result_format(path: Path | None, given: str | None = None) -> ResultFormat:
    """*given* (``jsonl`` or ``csv``), else CSV for a ``.csv`` *path*, else JSONL."""
    if given is not None:
        if given not in ("jsonl", "csv"):
            raise InputError(f"unknown results format {given!r}: use jsonl or csv")
        return "csv" if given == "csv" else "jsonl"
    return "csv" if path is not None and path.suffix.lower() == ".csv" else "jsonl"


def _record(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "prompt_id": row["external_id"],
        "target": row["target"],
        "model": row["model"],
        "response_text": row["response_text"],
        "parsed": json.loads(row["parsed"]) if row["parsed"] is not None else None,
        "tokens_in": row["tokens_in"],
        "tokens_out": row["tokens_out"],
        # at the target's pricing (less its batch discount when via_batch); None without one
        "cost": row["cost"],
        "via_batch": row["via_batch"],
        "latency_ms": round(row["latency_ms"], 1),
        "attempt": row["attempt"],
        "queue_id": row["queue_id"],
        "created_at": row["created_at"].isoformat(),
    }


@contextmanager
def _atomic(path: Path) -> Iterator[IO[str]]:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", encoding="utf-8", newline="") as out:
            yield out
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


async def write_results(
    conn: asyncpg.Connection, run_id: str, out: IO[str], kind: ResultFormat
) -> int:
    """Write every result of *run_id* to the stream *out*; return the number of rows."""
    writer = csv.DictWriter(out, fieldnames=COLUMNS) if kind == "csv" else None
    if writer is not None:
        writer.writeheader()
    written = after = 0
    while page := await monitor.results_page(conn, run_id, after, PAGE_SIZE):
        for row in page:
            record = _record(row)
            if writer is not None:
                parsed = record["parsed"]
                record["parsed"] = json.dumps(parsed) if parsed is not None else ""
                writer.writerow(record)
            else:
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
        written += len(page)
        after = page[-1]["id"]
    return written


async def export_results(
    conn: asyncpg.Connection, run_id: str, path: Path, fmt: str | None = None
) -> int:
    """Write every result of *run_id* to the file *path*; return the number of rows."""
    kind = result_format(path, fmt)
    with _atomic(path) as out:
        return await write_results(conn, run_id, out, kind)

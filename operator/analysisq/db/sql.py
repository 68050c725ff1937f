"""Named SQL blocks from ``sql/queries.sql``, loaded once.

A block starts with ``-- name: NAME``; the comment lines right after it document the query.
Nothing else in analysisq holds SQL text, and nothing formats values into it.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"
_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


@cache
def queries() -> dict[str, str]:
    text = (SQL_DIR / "queries.sql").read_text(encoding="utf-8")
    parts = _NAME.split(text)
    # parts = [preamble, name1, body1, name2, body2, ...]
    out: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in out:
            raise RuntimeError(f"queries.sql defines {name!r} twice")
        out[name] = body.strip()
    return out


def query(name: str) -> str:
    """The text of the named query (KeyError names the missing block)."""
    return queries()[name]

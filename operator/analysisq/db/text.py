"""Values as PostgreSQL can store them: the one place every text written to the queue passes.

PostgreSQL text cannot hold NUL, UTF-8 cannot encode a lone UTF-16 surrogate (a gateway that
cuts an emoji in half sends ``"\\ud83d"``), jsonb refuses the ``\\u0000`` escape, NaN and
Infinity, and an ``integer`` column stops at 2^31 - 1. A value the database would refuse
never reaches it: text is repaired (U+FFFD for what cannot be stored) and cut to its
column's limit, and what cannot be stored at all becomes NULL, so that one odd character of
an answer or an error message never costs the item.
"""

from __future__ import annotations

import json
import re
from typing import Any

#: The largest value of a PostgreSQL ``integer`` column.
MAX_INT4 = 2**31 - 1

_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def db_text(value: str, limit: int | None = None) -> str:
    """*value* with NUL and lone surrogates replaced by U+FFFD, cut to *limit* characters."""
    clean = _UNSTORABLE.sub("\ufffd", value)
    if limit is not None and len(clean) > limit:
        clean = clean[: limit - 1] + "…"
    return clean


def db_json(value: Any, text: str | None = None) -> str | None:
    """JSON text for a jsonb column, every string repaired; None when it is not JSON at all
    (NaN, Infinity, objects that are not JSON types). *text*, the JSON *value* was decoded
    from, is that text itself when jsonb takes it as it is (no encoding on the hot path)."""
    if value is None:
        return None
    if text is not None and _storable_json(text):
        return text
    try:
        dumped = json.dumps(value, ensure_ascii=False, allow_nan=False)
        # Usually nothing needs repair: json.dumps escapes NUL (as \u0000, which jsonb refuses)
        # and leaves lone surrogates as they are, so the text shows both. Repairing first would
        # walk every answer's every string on the worker's hot path.
        if "\\u0000" not in dumped and _UNSTORABLE.search(dumped) is None:
            return dumped
        return json.dumps(_repaired(value), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return None


def _storable_json(text: str) -> bool:
    """jsonb takes this JSON text as it is: no ``\\u`` escape (``\\u0000``, a lone
    surrogate), no NaN or Infinity, no NUL or lone surrogate character. Text with any of
    them, even where it would be harmless, is encoded again from its decoded value."""
    return (
        "\\u" not in text
        and "NaN" not in text
        and "Infinity" not in text
        and _UNSTORABLE.search(text) is None
    )


def db_int(value: int | None) -> int | None:
    """A count for an ``integer`` column that must be >= 0; None when it cannot be one."""
    if value is None or isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if 0 <= value <= MAX_INT4 else None


def _repaired(value: Any) -> Any:
    if isinstance(value, str):
        return db_text(value)
    if isinstance(value, dict):
        return {(db_text(k) if isinstance(k, str) else k): _repaired(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_repaired(v) for v in value]
    return value

"""Structured logs: one JSON object per line with the run, item and worker ids as fields.

Use ``log.info("claimed", extra={"run": ..., "item": ...})``; the formatter lifts every extra
field into the JSON object (or, with ``--log-format text``, appends it as ``key=value``).
Messages, tracebacks and extra fields are redacted on the way out, in both formats, as a last
line of defence.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

from analysisq.errors import redact

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message"}


def _redacted(value: object) -> object:
    """An extra field as it may be written: strings masked, numbers as they are, anything
    else kept whole unless its JSON text holds something credential-like."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return redact(value, limit=4000)
    text = json.dumps(value, default=str)
    masked = redact(text, limit=4000)
    return value if masked == text else masked


def _extras(record: logging.LogRecord) -> dict[str, object]:
    return {
        key: _redacted(value)
        for key, value in record.__dict__.items()
        if key not in _STANDARD and not key.startswith("_")
    }


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage(), limit=4000),
            **_extras(record),
        }
        if record.exc_info:
            out["exc"] = redact(self.formatException(record.exc_info), limit=8000)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    """``time LEVEL logger message key=value ...`` for people reading a terminal: the same
    fields and the same redaction as the JSON lines, so ``error`` is never dropped."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        fields = " ".join(f"{key}={_shown(value)}" for key, value in _extras(record).items())
        return redact(f"{line} {fields}" if fields else line, limit=8000)

    def formatException(self, ei: Any) -> str:
        return redact(super().formatException(ei), limit=8000)


def _shown(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if text and not any(c.isspace() or c in "='\"" for c in text) else repr(text)


class OneLineLibraryErrors(logging.Filter):
    """asyncpg logs each failed reconnect of its pool with the whole traceback; a database
    restart would fill the run's output with them. Keep one line: the message and the error.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.name.split(".")[0] == "asyncpg":
            exc = record.exc_info[1]
            record.msg = f"{record.getMessage()}: {type(exc).__name__}: {exc}"
            record.args = ()
            record.exc_info = None
            record.exc_text = None
        return True


def setup_logging(level: str = "INFO", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(OneLineLibraryErrors())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # httpx logs every request URL at INFO; keep it quiet.
    logging.getLogger("httpx").setLevel(logging.WARNING)

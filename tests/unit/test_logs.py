"""Log output: one line per record, whatever a library attaches to it."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from analysisq.logs import setup_logging


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _asyncpg_reconnect_warning() -> None:
    """What asyncpg's pool logs on each failed attempt to restore its connections."""
    try:
        raise ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 5432)")
    except ConnectionRefusedError:
        logging.getLogger("asyncpg.pool").warning(
            "Failed to restore the pool connection floor; retrying", exc_info=True
        )


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_asyncpg_reconnect_warnings_are_one_line_each(
    fmt: str, capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    setup_logging("INFO", fmt)
    _asyncpg_reconnect_warning()
    _asyncpg_reconnect_warning()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    for line in lines:
        assert "Traceback" not in line and "\\n" not in line
        assert "retrying: ConnectionRefusedError: [Errno 111] Connect call failed" in line
        if fmt == "json":
            assert "exc" not in json.loads(line)


def test_our_own_errors_keep_their_traceback(
    capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    setup_logging("INFO", "json")
    try:
        raise RuntimeError("a bug")
    except RuntimeError:
        logging.getLogger("analysisq.worker").exception("unexpected")
    record = json.loads(capsys.readouterr().err)
    assert "Traceback" in record["exc"]


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_extra_fields_are_shown_and_redacted_in_both_formats(
    fmt: str, capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    setup_logging("INFO", fmt)
    logging.getLogger("analysisq.worker").warning(
        "claim failed",
        extra={
            "run": "daily-1",
            "error": "connect to postgresql://app:hunter2@db/x: Bearer sk-live-abcdef123456",
            "items": 3,
        },
    )
    line = capsys.readouterr().err.strip()
    assert "hunter2" not in line and "sk-live-abcdef123456" not in line
    if fmt == "json":
        record = json.loads(line)
        assert record["run"] == "daily-1" and record["items"] == 3
        assert record["error"].startswith("connect to postgresql://***@db/x")
    else:
        assert "claim failed" in line
        assert "run=daily-1" in line and "items=3" in line
        assert "error='connect to postgresql://***@db/x" in line


def test_a_text_message_is_redacted(
    capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    setup_logging("INFO", "text")
    logging.getLogger("analysisq").info("using api_key=sk-abcdefghijkl for %s", "openai")
    line = capsys.readouterr().err
    assert "sk-abcdefghijkl" not in line and "for openai" in line

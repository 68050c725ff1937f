"""Read and validate a prompt file (CSV or JSONL), row by row, without losing the good rows.

The file is read as bytes and decoded one physical line at a time, so a line that is not
valid UTF-8 rejects its own row and nothing else. Every record comes out either as a
``PromptRow`` ready to store or as a ``Rejection`` with its line number and reason: empty or
over-long text, bad encoding, an id repeated in the file, a short or long CSV row, bad JSON,
a bad ``active`` or ``metadata`` value. A file whose header lacks the id or text column is
refused as a whole (``InputError``). ``prompt_import`` stores what this module yields.

CSV: a header row naming ``id`` (or ``external_id``), ``text`` (or ``prompt``) and optionally
``tags`` (separated by ``;`` or ``|``), ``active`` (true/false, yes/no, 1/0) and ``metadata``
(a JSON object). JSONL: one JSON object per line with the same keys; ``tags`` may be a list.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

from analysisq.errors import InputError
from analysisq.queue.prompts import Prompt

Format = Literal["csv", "jsonl"]
#: The database's limit on ``prompts.external_id``.
MAX_ID_CHARS = 512
_ID_KEYS = ("id", "external_id")
_TEXT_KEYS = ("text", "prompt")
_OPTIONAL_KEYS = ("tags", "active", "metadata")
_TAG_SEPARATORS = re.compile(r"[;|]")
_TRUE = {"true", "t", "yes", "y", "1"}
_FALSE = {"false", "f", "no", "n", "0"}


@dataclass(frozen=True, kw_only=True)
class PromptRow(Prompt):
    """One valid prompt, with the line it starts on."""

    line: int


@dataclass(frozen=True)
class Rejection:
    """A row that was not stored, and why."""

    line: int
    reason: str
    external_id: str | None = None

    def __str__(self) -> str:
        who = f" (id {self.external_id!r})" if self.external_id else ""
        return f"line {self.line}{who}: {self.reason}"


class _RowError(Exception):
    """A reason to reject the current row."""


def detect_format(path: Path, given: str | None = None) -> Format:
    """The file's format from *given* or its extension (``.csv``; ``.jsonl``/``.ndjson``)."""
    name = (given or path.suffix.lstrip(".")).lower()
    if name in ("csv", "tsv"):
        return "csv"
    if name in ("jsonl", "ndjson", "json"):
        return "jsonl"
    raise InputError(f"{path}: cannot tell the format from the name; use --format csv|jsonl")


class PromptFile:
    """A prompt file to read once: iterate it for rows and rejections, in file order.

    After the header is read, ``ignored_columns`` names the CSV columns the import ignores.
    """

    def __init__(self, path: Path, *, max_chars: int, fmt: str | None = None) -> None:
        self.path = path
        self.format = detect_format(path, fmt)
        self.max_chars = max_chars
        self.ignored_columns: list[str] = []

    def __iter__(self) -> Iterator[PromptRow | Rejection]:
        try:
            stream = self.path.open("rb")
        except OSError as exc:
            raise InputError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        with stream:
            lines = _Lines(stream)
            records = (
                _parse_csv(lines, self.ignored_columns)
                if self.format == "csv"
                else _parse_jsonl(lines)
            )
            yield from _Validator(self.max_chars).check(records)


class _Lines:
    """Physical lines of a byte stream, decoded one by one; remembers the undecodable ones."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self.number = 0
        self.bad: dict[int, str] = {}

    def __iter__(self) -> Iterator[str]:
        for raw in self._stream:
            self.number += 1
            if self.number == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                self.bad[self.number] = (
                    f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})"
                )
                yield raw.decode("utf-8", errors="replace")

    def encoding_error(self, first: int, last: int) -> str | None:
        for n in range(first, last + 1):
            if n in self.bad:
                return self.bad[n]
        return None


# A parsed record before validation: its first line and either its fields or an error.
_Record = tuple[int, dict[str, Any] | _RowError]


def _parse_csv(lines: _Lines, ignored: list[str]) -> Iterator[_Record]:
    # Large enough that an over-long prompt is reported as such, not as a CSV error.
    csv.field_size_limit(max(csv.field_size_limit(), 64 * 1024 * 1024))
    reader = csv.reader(iter(lines), strict=True)
    header: list[str] | None = None
    while True:
        first = reader.line_num + 1
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            yield first, _RowError(f"not valid CSV: {exc}")
            continue
        bad = lines.encoding_error(first, reader.line_num)
        if header is None:
            if bad:
                raise InputError(f"line {first}: the header is {bad}")
            header = _header(record, first)
            known = {*_ID_KEYS, *_TEXT_KEYS, *_OPTIONAL_KEYS}
            ignored.extend(h for h in header if h not in known)
            continue
        if not record or record == [""]:
            continue
        if bad:
            yield first, _RowError(bad)
        elif len(record) != len(header):
            yield first, _RowError(f"has {len(record)} fields; the header has {len(header)}")
        else:
            yield first, dict(zip(header, record, strict=True))
    if header is None:
        raise InputError("the file is empty: expected a header row with id and text columns")


def _header(record: list[str], line: int) -> list[str]:
    names = [h.strip().lower() for h in record]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InputError(f"line {line}: the header repeats columns {', '.join(dupes)}")
    for keys, what in ((_ID_KEYS, "id"), (_TEXT_KEYS, "text")):
        found = [k for k in keys if k in names]
        if not found:
            raise InputError(
                f"line {line}: missing column {what!r} (or {keys[1]!r}); "
                f"the header has: {', '.join(names) or '(nothing)'}"
            )
        if len(found) > 1:
            raise InputError(f"line {line}: both {found[0]!r} and {found[1]!r} columns; keep one")
    return names


def _parse_jsonl(lines: _Lines) -> Iterator[_Record]:
    for text in lines:
        number = lines.number
        if not text.strip():
            continue
        bad = lines.encoding_error(number, number)
        if bad:
            yield number, _RowError(bad)
            continue
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            yield number, _RowError(f"not valid JSON: {exc.msg} at column {exc.colno}")
            continue
        if not isinstance(data, dict):
            yield number, _RowError(f"expected a JSON object, got {type(data).__name__}")
            continue
        yield number, data


class _Validator:
    """Turns records into rows or rejections; remembers ids to refuse repeats."""

    def __init__(self, max_chars: int) -> None:
        self.max_chars = max_chars
        self.seen: dict[str, int] = {}

    def check(self, records: Iterable[_Record]) -> Iterator[PromptRow | Rejection]:
        for line, record in records:
            if isinstance(record, _RowError):
                yield Rejection(line, str(record))
                continue
            external_id = None
            try:
                external_id = _external_id(record)
                first = self.seen.setdefault(external_id, line)
                if first != line:
                    raise _RowError(f"duplicate id (first seen on line {first})")
                yield self._row(line, external_id, record)
            except _RowError as exc:
                yield Rejection(line, str(exc), external_id)

    def _row(self, line: int, external_id: str, record: dict[str, Any]) -> PromptRow:
        text = _pick(record, _TEXT_KEYS)
        if text is None:
            raise _RowError("missing field 'text'")
        if not isinstance(text, str):
            raise _RowError(f"'text' must be a string, got {type(text).__name__}")
        if not text.strip():
            raise _RowError("empty text")
        if len(text) > self.max_chars:
            raise _RowError(f"text has {len(text):,} characters; the limit is {self.max_chars:,}")
        if "\x00" in text:
            raise _RowError("text contains a NUL character")
        return PromptRow(
            line=line,
            external_id=external_id,
            text=text,
            tags=_tags(record.get("tags")),
            active=_active(record.get("active")),
            metadata=_metadata(record.get("metadata")),
        )


def _pick(record: dict[str, Any], keys: tuple[str, ...]) -> Any:
    for key in keys:
        if key in record:
            return record[key]
    return None


def _external_id(record: dict[str, Any]) -> str:
    value = _pick(record, _ID_KEYS)
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise _RowError("missing field 'id'" if value is None else "'id' must be a string")
    external_id = str(value).strip()
    if not external_id:
        raise _RowError("empty id")
    if len(external_id) > MAX_ID_CHARS:
        raise _RowError(f"id has {len(external_id)} characters; the limit is {MAX_ID_CHARS}")
    if "\x00" in external_id:
        raise _RowError("id contains a NUL character")
    return external_id


def _tags(value: Any) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        parts = _TAG_SEPARATORS.split(value)
    elif isinstance(value, list) and all(isinstance(t, str) for t in value):
        parts = value
    else:
        raise _RowError("'tags' must be text separated by ';' or '|', or a list of strings")
    return tuple(dict.fromkeys(t.strip() for t in parts if t.strip()))


def _active(value: Any) -> bool:
    if value is None or value == "":
        return True
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise _RowError(f"'active' must be true or false, got {value!r}")


def _metadata(value: Any) -> dict[str, Any]:
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise _RowError(f"'metadata' is not valid JSON: {exc.msg}") from None
    if not isinstance(value, dict):
        raise _RowError("'metadata' must be a JSON object")
    return value

"""A batch request encoded as JSON with less work: the prompt escaped on its UTF-8 bytes.

A batch input holds one JSON request per prompt, and the prompt is nearly all of its bytes.
``json.dumps`` escapes a string a character at a time; the escapes JSON needs are all ASCII
(``"``, ``\\`` and the control characters below 0x20) and UTF-8 never uses an ASCII byte
inside a multi-byte character, so the same escaping can be done on the encoded bytes with
C-speed ``bytes.replace`` for the usual ones. ``request_json`` gives exactly the bytes of
``json.dumps(record, ensure_ascii=False).encode()``: the record is dumped with a marker where
the prompt stands (the request builder's own dict: its last message's ``content``), and the
escaped prompt is put in the marker's place. Anything unexpected (the prompt not found there
as built, the marker elsewhere in the record, a rare control character) takes ``json.dumps``
of the whole record.
"""

from __future__ import annotations

import json
from typing import Any

#: Stands for the prompt while the rest of the record is dumped; JSON writes it ``"\u0000"``.
_MARK = "\x00"
_MARK_JSON = json.dumps(_MARK)
#: The escapes of ``json.dumps`` for the bytes that prompts hold, backslash first.
_ESCAPES = ((b"\\", b"\\\\"), (b'"', b'\\"'), (b"\n", b"\\n"), (b"\r", b"\\r"), (b"\t", b"\\t"))
_CONTROL = bytes(range(0x20))


def json_string(text: str) -> bytes:
    """*text* as a JSON string in UTF-8: ``json.dumps(text, ensure_ascii=False).encode()``."""
    data = text.encode()
    for raw, escaped in _ESCAPES:
        if raw in data:  # a fast search; most prompts hold few of these, if any
            data = data.replace(raw, escaped)
    if len(data.translate(None, _CONTROL)) != len(data):  # \b, \f, \x01...: rare
        return json.dumps(text, ensure_ascii=False).encode()
    return b'"' + data + b'"'


def request_json(
    record: dict[str, Any],
    body: dict[str, Any],
    prompt: str,
    *,
    separators: tuple[str, str] | None = None,
) -> bytes:
    """*record* (holding the request builder's *body* for *prompt*) as JSON in UTF-8, the
    bytes ``json.dumps(record, ensure_ascii=False, separators=...)`` gives (see the module
    docstring)."""
    messages = body.get("messages")
    last = messages[-1] if isinstance(messages, list) and messages else None
    if isinstance(last, dict) and last.get("content") is prompt:
        last["content"] = _MARK
        head, mark, tail = json.dumps(record, ensure_ascii=False, separators=separators).partition(
            _MARK_JSON
        )
        last["content"] = prompt
        if mark and _MARK_JSON not in tail:
            return head.encode() + json_string(prompt) + tail.encode()
    return json.dumps(record, ensure_ascii=False, separators=separators).encode()

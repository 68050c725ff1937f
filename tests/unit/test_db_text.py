"""Values as PostgreSQL can store them (``analysisq.db.text``)."""

from __future__ import annotations

import json

import pytest

from analysisq.db.text import MAX_INT4, db_int, db_json, db_text

pytestmark = pytest.mark.unit


def test_text_loses_only_what_postgresql_cannot_hold() -> None:
    assert db_text("a\x00b \ud83d c \udc00 😀 é") == "a\ufffdb \ufffd c \ufffd 😀 é"
    assert db_text("x" * 10, 5) == "xxxx…" and db_text("short", 5) == "short"


def test_json_keeps_literals_and_repairs_strings() -> None:
    stored = db_json({"lit": "\\u0000", "nul": "a\x00", "cut\ud83d": ["\ud83d", 1, None]})
    assert stored is not None
    assert json.loads(stored) == {
        "lit": "\\u0000",
        "nul": "a\ufffd",
        "cut\ufffd": ["\ufffd", 1, None],
    }
    assert "\\u0000" not in stored.replace("\\\\u0000", "")  # no NUL escape left for jsonb
    assert db_json(None) is None
    assert db_json({"x": float("nan")}) is None and db_json({"x": object()}) is None


def test_json_repairs_each_unstorable_kind_alone() -> None:
    # one kind at a time: text with nothing to repair is stored as json.dumps wrote it
    assert db_json({"nul": "a\x00"}) == '{"nul": "a\ufffd"}'
    assert db_json({"k\x00": 1}) == '{"k\ufffd": 1}'
    assert db_json(["\ud83d"]) == '["\ufffd"]'
    assert db_json({"lit": "\\u0000", 1: (2, "é")}) == '{"lit": "\\\\u0000", "1": [2, "é"]}'


def test_json_text_is_stored_as_sent_unless_jsonb_could_refuse_it() -> None:
    # the text an answer was parsed from is stored as it is: no second encoding per item
    sent = '{"a":[1,"é 😀"],"b":null}'
    assert db_json(json.loads(sent), sent) is sent
    # anything jsonb may refuse goes the way of a value without text, one kind at a time
    assert db_json({"nul": "a\x00"}, '{"nul":"a\\u0000"}') == '{"nul": "a\ufffd"}'
    assert db_json(["\ud83d"], '["\\ud83d"]') == '["\ufffd"]'
    assert db_json(["\ud83d"], '["\ud83d"]') == '["\ufffd"]'
    assert db_json({"k\x00": 1}, '{"k\x00":1}') == '{"k\ufffd": 1}'
    assert db_json({"x": float("nan")}, '{"x":NaN}') is None
    assert db_json([float("-inf")], "[-Infinity]") is None
    # a harmless escape is re-encoded too (the check is by substring), and stays equal
    assert json.loads(db_json({"a": "A"}, '{"a":"\\u0041"}') or "") == {"a": "A"}
    assert db_json(None, "null") is None


def test_counts_outside_an_integer_column_are_null() -> None:
    assert [db_int(v) for v in (0, 7, MAX_INT4)] == [0, 7, MAX_INT4]
    assert [db_int(v) for v in (None, -1, MAX_INT4 + 1, True)] == [None] * 4

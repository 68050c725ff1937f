"""Prompt files with every kind of bad row: each is rejected with its line number and reason,
and every good row around it survives (``analysisq.local.prompt_file``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from analysisq.errors import InputError
from analysisq.local.prompt_file import PromptFile, PromptRow, Rejection

pytestmark = pytest.mark.unit


def read(path: Path, max_chars: int = 100) -> tuple[list[PromptRow], list[Rejection]]:
    records = list(PromptFile(path, max_chars=max_chars))
    rows = [r for r in records if isinstance(r, PromptRow)]
    rejected = [r for r in records if isinstance(r, Rejection)]
    return rows, rejected


def reasons(rejected: list[Rejection]) -> dict[int, str]:
    return {r.line: r.reason for r in rejected}


def test_csv_every_kind_of_bad_row(tmp_path: Path) -> None:
    path = tmp_path / "prompts.csv"
    path.write_bytes(
        b"id,text,tags,active,metadata\n"  # line 1
        b'ok-1,"What is the best CRM?",crm;b2b,true,"{""k"": 1}"\n'  # 2
        b"empty,,,,\n"  # 3
        b"blank,   ,,,\n"  # 4
        b"long," + b"x" * 101 + b",,,\n"  # 5
        b"ok-1,duplicate,,,\n"  # 6
        b"badactive,text,,maybe,\n"  # 7
        b"badmeta,text,,,{nope\n"  # 8
        b"listmeta,text,,,[1]\n"  # 9
        b"short,text\n"  # 10
        b"long-row,text,,,,extra\n"  # 11
        b"enc,caf\xe9 latte,,,\n"  # 12
        b',"no id",,,\n'  # 13
        b'ok-2,"multi\nline",a|b| a ,no,\n'  # 14-15
        b"ok-3,last one,,,\n"  # 16
    )
    rows, rejected = read(path)
    assert [r.external_id for r in rows] == ["ok-1", "ok-2", "ok-3"]
    assert [r.line for r in rows] == [2, 14, 16]
    assert rows[0].tags == ("crm", "b2b") and rows[0].metadata == {"k": 1} and rows[0].active
    assert rows[1].text == "multi\nline" and rows[1].tags == ("a", "b") and not rows[1].active
    assert reasons(rejected) == {
        3: "empty text",
        4: "empty text",
        5: "text has 101 characters; the limit is 100",
        6: "duplicate id (first seen on line 2)",
        7: "'active' must be true or false, got 'maybe'",
        8: "'metadata' is not valid JSON: Expecting property name enclosed in double quotes",
        9: "'metadata' must be a JSON object",
        10: "has 2 fields; the header has 5",
        11: "has 6 fields; the header has 5",
        12: "not valid UTF-8 (byte 0xe9 at column 8)",
        13: "empty id",
    }
    assert str(rejected[0]) == "line 3 (id 'empty'): empty text"


def test_csv_aliases_bom_crlf_and_ignored_columns(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_bytes(b"\xef\xbb\xbfExternal_ID,Prompt,owner\r\na,first,me\r\nb,second,\r\n")
    source = PromptFile(path, max_chars=100)
    rows = [r for r in source if isinstance(r, PromptRow)]
    assert [(r.external_id, r.text) for r in rows] == [("a", "first"), ("b", "second")]
    assert source.ignored_columns == ["owner"]


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (
            b"text,tags\n",
            "line 1: missing column 'id' (or 'external_id'); the header has: text, tags",
        ),
        (b"id,tags\n", "line 1: missing column 'text' (or 'prompt')"),
        (b"id,text,id\n", "line 1: the header repeats columns id"),
        (b"id,external_id,text\n", "line 1: both 'id' and 'external_id' columns; keep one"),
        (b"", "the file is empty"),
    ],
)
def test_csv_bad_header_refuses_the_file(tmp_path: Path, header: bytes, message: str) -> None:
    path = tmp_path / "p.csv"
    path.write_bytes(header + b"a,b,c\n" if header else b"")
    with pytest.raises(InputError) as exc:
        list(PromptFile(path, max_chars=100))
    assert message in exc.value.message


def test_csv_bad_quoting_loses_only_its_row(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_bytes(b'id,text\na,"fine"\nb,"broken"quote\nc,also fine\n')
    rows, rejected = read(path)
    assert [r.external_id for r in rows] == ["a", "c"]
    assert [r.line for r in rejected] == [3]
    assert rejected[0].reason.startswith("not valid CSV")


def test_jsonl_every_kind_of_bad_row(tmp_path: Path) -> None:
    path = tmp_path / "prompts.jsonl"
    lines = [
        json.dumps({"id": "a", "text": "one", "tags": ["x", "y"], "metadata": {"m": 1}}),  # 1
        "{not json",  # 2
        json.dumps(["a", "list"]),  # 3
        json.dumps({"text": "no id"}),  # 4
        json.dumps({"id": "b"}),  # 5
        json.dumps({"id": "c", "text": 5}),  # 6
        json.dumps({"id": "a", "text": "again"}),  # 7
        json.dumps({"id": "d", "text": "t", "tags": [1, 2]}),  # 8
        json.dumps({"id": "e", "text": "t", "active": "sometimes"}),  # 9
        "",  # 10: blank lines are skipped
        json.dumps({"id": 42, "prompt": "numeric id", "active": False, "tags": "p|q"}),  # 11
        json.dumps({"id": "f", "text": "nul\x00byte"}),  # 12
    ]
    data = "\n".join(lines).encode() + b'\n{"id": "g", "text": "\xff"}\n'  # 13
    path.write_bytes(data)
    rows, rejected = read(path)
    assert [(r.external_id, r.line) for r in rows] == [("a", 1), ("42", 11)]
    assert rows[1].tags == ("p", "q") and rows[1].active is False
    assert reasons(rejected) == {
        2: "not valid JSON: Expecting property name enclosed in double quotes at column 2",
        3: "expected a JSON object, got list",
        4: "missing field 'id'",
        5: "missing field 'text'",
        6: "'text' must be a string, got int",
        7: "duplicate id (first seen on line 1)",
        8: "'tags' must be text separated by ';' or '|', or a list of strings",
        9: "'active' must be true or false, got 'sometimes'",
        12: "text contains a NUL character",
        13: "not valid UTF-8 (byte 0xff at column 22)",
    }


def test_format_from_the_extension_or_given(tmp_path: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_text('{"id": "a", "text": "x"}\n')
    with pytest.raises(InputError, match="--format"):
        PromptFile(path, max_chars=10)
    records = list(PromptFile(path, max_chars=10, fmt="jsonl"))
    assert records == [PromptRow(line=1, external_id="a", text="x")]

"""``analysisq prompts import`` with broken files: every rejected row is reported with its line
number, the exit code is 2, and every valid row is stored (and re-imports count right)."""

from __future__ import annotations

import json
from pathlib import Path

import asyncpg
import pytest
from test_runbook_cli import invoke, invoke_json

pytestmark = pytest.mark.db

BROKEN_CSV = (
    b"id,text,tags,active,metadata\n"
    b'a,"Which CRM is best for a small agency?",crm;smb,true,"{""brand"": ""HubSpot""}"\n'
    b"b,,,,\n"
    b"c," + b"x" * 51 + b",,,\n"
    b"a,duplicate of a,,,\n"
    b"d,caf\xe9,,,\n"
    b"e,text,,perhaps,\n"
    b"f,text,,,{oops\n"
    b"g,short row\n"
    b'h,"Rank Nike, Adidas and Hoka",shoes|running,no,\n'
)


async def stored(db: asyncpg.Connection) -> dict[str, tuple[str, list[str], bool, str]]:
    rows = await db.fetch("SELECT external_id, text, tags, active, metadata::text FROM prompts")
    return {r[0]: (r[1], list(r[2]), r[3], r[4]) for r in rows}


async def test_broken_csv(db: asyncpg.Connection, db_url: str, tmp_path: Path) -> None:
    path = tmp_path / "prompts.csv"
    path.write_bytes(BROKEN_CSV)
    result = await invoke(db_url, "prompts", "import", str(path), "--max-prompt-chars", "50")
    assert result.exit_code == 2, result.output
    assert result.stdout.splitlines()[:7] == [
        "rejected line 3 (id 'b'): empty text",
        "rejected line 4 (id 'c'): text has 51 characters; the limit is 50",
        "rejected line 5 (id 'a'): duplicate id (first seen on line 2)",
        "rejected line 6: not valid UTF-8 (byte 0xe9 at column 6)",
        "rejected line 7 (id 'e'): 'active' must be true or false, got 'perhaps'",
        "rejected line 8 (id 'f'): 'metadata' is not valid JSON: Expecting property name "
        "enclosed in double quotes",
        "rejected line 9: has 2 fields; the header has 5",
    ]
    assert f"{path}: 2 inserted, 0 updated, 0 unchanged, 7 rejected" in result.stdout
    assert "error: 7 rows rejected; the 2 valid rows were stored" in result.stderr
    assert await stored(db) == {
        "a": ("Which CRM is best for a small agency?", ["crm", "smb"], True,
              '{"brand": "HubSpot"}'),
        "h": ("Rank Nike, Adidas and Hoka", ["shoes", "running"], False, "{}"),
    }  # fmt: skip


async def test_broken_jsonl_json_report(
    db: asyncpg.Connection, db_url: str, tmp_path: Path
) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text(
        '{"id": "x", "text": "fine"}\n'
        "not json\n"
        '{"id": "y"}\n'
        "\n"
        '{"id": "z", "prompt": "also fine", "tags": ["t"]}\n'
    )
    result = await invoke(db_url, "prompts", "import", str(path), "--json")
    assert result.exit_code == 2
    report = json.loads(result.stdout)
    assert (report["inserted"], report["updated"], report["unchanged"]) == (2, 0, 0)
    assert report["rejected"] == [
        {"line": 2, "id": None, "reason": "not valid JSON: Expecting value at column 1"},
        {"line": 3, "id": "y", "reason": "missing field 'text'"},
    ]
    assert set(await stored(db)) == {"x", "z"}


async def test_reimport_counts_updates_and_dry_run(
    db: asyncpg.Connection, db_url: str, tmp_path: Path
) -> None:
    path = tmp_path / "prompts.csv"
    path.write_text("external_id,prompt,tags\np1,one,a\np2,two,b\np3,three,c\n")
    first = await invoke_json(db_url, "prompts", "import", str(path))
    assert (first["inserted"], first["updated"], first["unchanged"]) == (3, 0, 0)

    path.write_text("external_id,prompt,tags\np1,one,a\np2,two changed,b\np3,three,c|d\np4,4,\n")
    dry = await invoke_json(db_url, "prompts", "import", str(path), "--dry-run")
    assert (dry["valid"], dry["inserted"], dry["dry_run"]) == (4, 0, True)
    assert set(await stored(db)) == {"p1", "p2", "p3"}

    second = await invoke_json(db_url, "prompts", "import", str(path), "--import-batch-size", "2")
    assert (second["inserted"], second["updated"], second["unchanged"]) == (1, 2, 1)
    prompts = await stored(db)
    assert prompts["p2"][0] == "two changed" and prompts["p3"][1] == ["c", "d"]


async def test_missing_column_refuses_the_file(
    db: asyncpg.Connection, db_url: str, tmp_path: Path
) -> None:
    path = tmp_path / "prompts.csv"
    path.write_text("id,body\n1,hello\n")
    result = await invoke(db_url, "prompts", "import", str(path))
    assert result.exit_code == 2
    assert "line 1: missing column 'text' (or 'prompt'); the header has: id, body" in (
        result.stderr
    )
    assert await stored(db) == {}

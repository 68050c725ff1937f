"""Ordered migrations from ``sql/migrations``, recorded in ``analysisq_migrations``.

``migrate`` applies what is missing, each file in its own transaction that first takes a
transaction-scoped advisory lock and then re-reads what is applied, so that several processes
starting at once apply each migration once. The lock ends with the transaction (no session
lock): it works the same through a pooler in transaction mode. ``check_schema`` is what
the worker and the operator call at start: they refuse to run on a database that is behind
(run ``analysisq migrate``) or ahead of (upgrade analysisq) the code, or whose applied
migrations differ from the files.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from functools import cache

import asyncpg

from analysisq.db.connect import translated
from analysisq.db.sql import SQL_DIR
from analysisq.errors import SchemaMismatch

_FILE = re.compile(r"^(\d{4})_(\w+)\.sql$")
# pg_advisory_lock key: the first 8 bytes of sha256("analysisq.migrate") as a signed bigint.
_LOCK_KEY = int.from_bytes(hashlib.sha256(b"analysisq.migrate").digest()[:8], "big", signed=True)

_BOOTSTRAP = """
CREATE TABLE IF NOT EXISTS analysisq_migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str = field(repr=False)

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


@cache
def known_migrations() -> tuple[Migration, ...]:
    found = []
    for path in sorted((SQL_DIR / "migrations").glob("*.sql")):
        m = _FILE.match(path.name)
        if not m:
            raise RuntimeError(f"migration file {path.name} is not named NNNN_name.sql")
        found.append(Migration(int(m.group(1)), m.group(2), path.read_text(encoding="utf-8")))
    versions = [m.version for m in found]
    # Numbers are handed out per branch ahead of time, so a gap is allowed; a repeat is not.
    if len(set(versions)) != len(versions) or not versions or versions[0] != 1:
        raise RuntimeError(f"migration versions must start at 1 and be unique, found {versions}")
    return tuple(found)


def schema_version() -> int:
    """The schema version this code needs."""
    return known_migrations()[-1].version


async def migrate(conn: asyncpg.Connection) -> list[Migration]:
    """Apply the missing migrations; return those applied (empty when up to date)."""
    applied: list[Migration] = []
    with translated("migrating"):
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
            await conn.execute(_BOOTSTRAP)
            _check_known(await _applied(conn))
        for m in known_migrations():
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
                # read under the lock: another process may have applied it meanwhile
                if m.version in await _applied(conn):
                    continue
                await conn.execute(m.sql)
                await conn.execute(
                    "INSERT INTO analysisq_migrations (version, name, checksum)"
                    " VALUES ($1, $2, $3)",
                    m.version,
                    m.name,
                    m.checksum,
                )
            applied.append(m)
    return applied


async def _applied(conn: asyncpg.Connection) -> dict[int, str]:
    rows = await conn.fetch("SELECT version, checksum FROM analysisq_migrations")
    return {r["version"]: r["checksum"] for r in rows}


def _check_known(done: dict[int, str]) -> None:
    known = {m.version: m for m in known_migrations()}
    newer = sorted(v for v in done if v not in known)
    if newer:
        raise SchemaMismatch(
            f"the database has schema migrations {newer} that this analysisq does not know "
            f"(it knows up to {schema_version()}); upgrade analysisq"
        )
    changed = sorted(v for v, checksum in done.items() if known[v].checksum != checksum)
    if changed:
        raise SchemaMismatch(
            f"applied migrations {changed} differ from this analysisq's files; "
            "the database was migrated by a different build"
        )


async def check_schema(conn: asyncpg.Connection) -> int:
    """Raise ``SchemaMismatch`` unless the database is exactly at this code's schema."""
    with translated("checking the schema"):
        exists = await conn.fetchval("SELECT to_regclass('analysisq_migrations') IS NOT NULL")
        done: dict[int, str] = {}
        if exists:
            done = await _applied(conn)
    _check_known(done)
    missing = [m.version for m in known_migrations() if m.version not in done]
    if missing:
        raise SchemaMismatch(
            f"the database is missing schema migrations {missing}; run `analysisq migrate`"
        )
    return schema_version()

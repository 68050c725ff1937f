"""The schema: migrations equal the canonical schema, are idempotent, and guard the states."""

from __future__ import annotations

import asyncpg
import pytest

from analysisq.db.migrate import check_schema, migrate, schema_version
from analysisq.db.sql import SQL_DIR, queries
from analysisq.errors import SchemaMismatch
from support import add_prompts, new_run

pytestmark = pytest.mark.db

_SNAPSHOT = {
    "columns": """
        SELECT table_name, column_name, data_type, domain_name, is_nullable, column_default,
               is_identity
        FROM information_schema.columns WHERE table_schema = 'public'
        ORDER BY table_name, column_name""",
    "constraints": """
        SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid)
        FROM pg_constraint WHERE connamespace = 'public'::regnamespace
        ORDER BY 1, 2""",
    "indexes": "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY 1",
    "functions": """
        SELECT p.proname, pg_get_function_arguments(p.oid), pg_get_functiondef(p.oid)
        FROM pg_proc p WHERE p.pronamespace = 'public'::regnamespace ORDER BY 1, 2""",
    # identity sequences' parameters (migration 0014 caches the queue's ids)
    "sequences": """
        SELECT s.seqrelid::regclass::text, s.seqincrement, s.seqcache, s.seqcycle
        FROM pg_sequence s ORDER BY 1""",
    # the triggers that check the queue's references (migration 0011), not the RI ones
    "triggers": """
        SELECT tgrelid::regclass::text, tgname, pg_get_triggerdef(oid)
        FROM pg_trigger WHERE NOT tgisinternal ORDER BY 1, 2""",
}


async def _snapshot(conn: asyncpg.Connection) -> dict[str, list[tuple[object, ...]]]:
    return {k: [tuple(r) for r in await conn.fetch(q)] for k, q in _SNAPSHOT.items()}


async def test_migrations_produce_the_canonical_schema(db: asyncpg.Connection) -> None:
    migrated = await _snapshot(db)
    schema = (SQL_DIR / "schema.sql").read_text()
    await db.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public;")
    await db.execute(schema)
    canonical = await _snapshot(db)
    for part in _SNAPSHOT:
        assert canonical[part] == migrated[part], part
    assert len(migrated["constraints"]) > 10


async def test_migrate_is_idempotent_and_checked(db: asyncpg.Connection) -> None:
    assert await migrate(db) == []
    assert await check_schema(db) == schema_version()


async def test_an_unmigrated_database_is_refused(db: asyncpg.Connection) -> None:
    await db.execute("DROP TABLE analysisq_migrations")
    with pytest.raises(SchemaMismatch, match="run `analysisq migrate`"):
        await check_schema(db)


async def test_a_newer_database_is_refused(db: asyncpg.Connection) -> None:
    await db.execute(
        "INSERT INTO analysisq_migrations (version, name, checksum) VALUES (999, 'future', 'x')"
    )
    with pytest.raises(SchemaMismatch, match="upgrade analysisq"):
        await check_schema(db)


async def test_every_named_query_prepares(db: asyncpg.Connection) -> None:
    """Each block of queries.sql is valid SQL against the schema."""
    for name, q in queries().items():
        try:
            statement = await db.prepare(q.text)
        except asyncpg.PostgresError as exc:  # pragma: no cover - the assertion message
            pytest.fail(f"query {name} does not prepare: {exc}")
        # every named parameter is one bind parameter the server sees, none left over
        assert len(statement.get_parameters()) == len(q.params), name


@pytest.mark.parametrize(
    ("sets", "violates"),
    [
        ("status = 'done'", "queue_status_check"),
        ("status = 'processing', next_attempt_at = NULL", "processing_has_lease"),
        ("status = 'completed', next_attempt_at = NULL", "completed_has_time"),
        ("status = 'completed', completed_at = now()", "next_attempt_only_when_waiting"),
        ("status = 'failed', next_attempt_at = NULL", "failed_has_reason"),
        ("attempts = -1", "analysis_queue_attempts_check"),
        ("error_class = 'oops'", "error_class_check"),
    ],
)
async def test_the_database_enforces_the_state_rules(
    db: asyncpg.Connection, sets: str, violates: str
) -> None:
    await add_prompts(db, 1)
    await new_run(db)
    with pytest.raises(asyncpg.exceptions.CheckViolationError, match=violates):
        await db.execute(f"UPDATE analysis_queue SET {sets}")

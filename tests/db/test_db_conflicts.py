"""A deadlock or a serialization failure is a conflict between transactions, not an outage.

PostgreSQL aborts one transaction of a lock cycle (40P01) or of a serializable conflict
(40001); the same statement succeeds when run again. ``translated`` reports them as their own
retryable errors, naming the statement, so that logs, the run's status and the
``reconcile_errors`` metric say "deadlock" rather than "database unavailable", and the
connection (the server answered) stays in the pool.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import asyncpg
import pytest

from analysisq.db.connect import acquire, create_pool, translated
from analysisq.errors import (
    DatabaseError,
    DatabaseTransient,
    DatabaseUnavailable,
    Deadlock,
    SerializationFailure,
)
from analysisq.queue import runs
from analysisq.settings import Settings
from analysisq.worker import Worker
from support import add_prompts, new_run, spec

pytestmark = [pytest.mark.db, pytest.mark.timeout(60)]


async def _table(db: asyncpg.Connection) -> None:
    await db.execute("CREATE TABLE scratch (id int PRIMARY KEY, n int NOT NULL)")
    await db.execute("INSERT INTO scratch VALUES (1, 0), (2, 0)")


async def _wait_for_lock_wait(db: asyncpg.Connection) -> None:
    for _ in range(500):
        # by database, not by pid: behind PgBouncer the client never learns the pid
        if await db.fetchval(
            "SELECT count(*) > 0 FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
        ):
            return
        await asyncio.sleep(0.01)
    pytest.fail("the first transaction never waited for the second's lock")


async def test_a_deadlock_is_reported_as_a_deadlock_naming_the_statement(
    db: asyncpg.Connection, db_url: str, client_options: dict[str, Any]
) -> None:
    await _table(db)
    pool = await create_pool(db_url, min_size=2, max_size=2, **client_options)

    async def lock(first: int, then: int, locked: asyncio.Event, go: asyncio.Event) -> None:
        async with acquire(pool) as conn, conn.transaction():
            with translated(f"updating row {first} then {then}"):
                await conn.execute("UPDATE scratch SET n = n + 1 WHERE id = $1", first)
                locked.set()
                await go.wait()
                await conn.execute("UPDATE scratch SET n = n + 1 WHERE id = $1", then)

    one_locked, two_locked, go_one, go_two = (asyncio.Event() for _ in range(4))
    try:
        one = asyncio.create_task(lock(1, 2, one_locked, go_one))
        two = asyncio.create_task(lock(2, 1, two_locked, go_two))
        await one_locked.wait()
        await two_locked.wait()
        go_one.set()  # the first waits for row 2, which the second holds
        await _wait_for_lock_wait(db)
        go_two.set()  # the second closes the cycle: it takes row 1, which the first holds
        results = await asyncio.gather(one, two, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        assert len(errors) == 1, results
        exc = errors[0]
        assert isinstance(exc, Deadlock), repr(exc)
        assert isinstance(exc, DatabaseTransient) and exc.retryable
        assert not isinstance(exc, DatabaseUnavailable)
        assert exc.reason == "Deadlock"
        assert exc.message.startswith("updating row "), exc.message
        assert ": deadlock, retried: " in exc.message and "unavailable" not in exc.message
        # the server answered: the connection was kept, both are still in the pool
        assert pool.get_size() == 2
        assert await db.fetchval("SELECT sum(n) FROM scratch") == 2
    finally:
        await pool.close()


async def test_a_serialization_failure_is_reported_as_such(
    db: asyncpg.Connection, db_url: str, client_options: dict[str, Any]
) -> None:
    await _table(db)
    a = await asyncpg.connect(db_url, **client_options)
    b = await asyncpg.connect(db_url, **client_options)
    try:
        ta, tb = a.transaction(isolation="serializable"), b.transaction(isolation="serializable")
        await ta.start()
        await tb.start()
        # each reads what the other writes: no serial order explains both
        await a.fetchval("SELECT n FROM scratch WHERE id = 1")
        await b.fetchval("SELECT n FROM scratch WHERE id = 2")
        await a.execute("UPDATE scratch SET n = 1 WHERE id = 2")
        await b.execute("UPDATE scratch SET n = 1 WHERE id = 1")
        await ta.commit()
        with (
            pytest.raises(SerializationFailure) as caught,
            translated("committing the second transaction"),
        ):
            await tb.commit()
        exc = caught.value
        assert isinstance(exc, DatabaseTransient) and not isinstance(exc, DatabaseUnavailable)
        assert exc.reason == "SerializationFailure"
        expected = "committing the second transaction: serialization failure, retried: "
        assert exc.message.startswith(expected), exc.message
    finally:
        await a.close()
        await b.close()


async def test_a_constraint_failing_at_commit_is_a_refusal_not_an_outage(
    db: asyncpg.Connection, db_url: str, client_options: dict[str, Any]
) -> None:
    """40002 is in class 40, but the transaction broke a rule: run again, it fails again."""
    await _table(db)
    await db.execute(
        """
        CREATE FUNCTION scratch_rule() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION 'n must stay below 10 (row %)', NEW.id
                USING ERRCODE = 'transaction_integrity_constraint_violation';
        END $$;
        CREATE CONSTRAINT TRIGGER scratch_rule AFTER UPDATE ON scratch
            DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (NEW.n >= 10)
            EXECUTE FUNCTION scratch_rule();
        """
    )
    pool = await create_pool(db_url, min_size=1, max_size=1, **client_options)
    try:
        with pytest.raises(DatabaseError) as caught:
            async with acquire(pool) as conn:
                with translated("raising row 1"):
                    async with conn.transaction():
                        # the deferred check runs at COMMIT, not here
                        await conn.execute("UPDATE scratch SET n = 10 WHERE id = 1")
        exc = caught.value
        assert not isinstance(exc, DatabaseTransient), repr(exc)
        assert exc.message == (
            "raising row 1: TransactionIntegrityConstraintViolationError:"
            " n must stay below 10 (row 1)"
        )
        # rolled back; the pool's one connection serves the next caller
        async with acquire(pool) as conn:
            assert await conn.fetchval("SELECT n FROM scratch WHERE id = 1") == 0
    finally:
        await pool.close()


async def test_a_worker_retries_a_deadlocked_write_and_logs_it_as_one(
    pool: asyncpg.Pool, caplog: pytest.LogCaptureFixture
) -> None:
    """The first write of the worker's answers is chosen as a deadlock's victim (a real 40P01
    from the server, raised by a trigger once): the answers stay buffered and are written on
    the next flush, and the log says deadlock, never that the database is unavailable."""
    async with pool.acquire() as db:
        await add_prompts(db, 20)
        await new_run(db, s=spec(batchSize=5))
        run = await runs.get_run(db, "run-1")
        await db.execute(_VICTIM_ONCE)
    settings = Settings(database_url="unused", poll_seconds=0.05)
    with caplog.at_level(logging.WARNING, logger="analysisq"):
        stats = await Worker(
            pool, run, settings, name="w1", exit_when_done=True
        ).run_until_stopped()
    assert stats.completed == stats.claimed == 20 and stats.failed == 0
    async with pool.acquire() as db:
        assert await db.fetchval("SELECT nextval('victims')") > 2  # the trigger did fire
        counts = await runs.counts(db, "run-1")
    assert (counts.completed, counts.failed_for_good, counts.retrying) == (20, 0, 0)
    unwritten = [r for r in caplog.records if r.getMessage() == "results not written yet"]
    assert unwritten and all(": deadlock, retried: " in r.__dict__["error"] for r in unwritten)
    assert not [r for r in caplog.records if "unavailable" in r.getMessage() + str(r.__dict__)]


#: A real 40P01 from the server for the first result a statement writes, none after (a
#: sequence is not rolled back with the aborted transaction).
_VICTIM_ONCE = """
CREATE SEQUENCE victims;
CREATE FUNCTION deadlock_once() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF nextval('victims') = 1 THEN
        RAISE EXCEPTION 'deadlock detected' USING ERRCODE = '40P01';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER deadlock_once BEFORE INSERT ON analysis_results
    FOR EACH ROW EXECUTE FUNCTION deadlock_once();
"""

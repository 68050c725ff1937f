-- 0011_set_based_references: the queue's references to its prompt and its run target are
-- checked once per statement instead of once per row, and the status index holds only the
-- failed rows, the one status the runbook looks rows up by. The 1M-item fill spent most of its time in the two
-- foreign keys' RI triggers (one call per inserted row each) and the rest in index entries
-- (docs/benchmarks.md, "fill"). The guarantees are those of the foreign keys they replace:
--   * a queue row's prompt and run target exist: checked after each INSERT (and each UPDATE
--     that changes them), so that a concurrent delete of one waits for the inserting
--     transaction and then sees its rows: the run targets (and, per row, an UPDATE's new
--     parents) are locked FOR KEY SHARE as the RI check locks them; the prompts of an INSERT,
--     up to 1M of them, are ordered against their deletes by one lock instead (below);
--   * a prompt the queue references cannot be deleted, re-keyed or truncated away (it was
--     ON DELETE NO ACTION; prompts are deactivated, not deleted);
--   * deleting a run target deletes its queue rows (it was ON DELETE CASCADE; deleting a run
--     cascades to its targets, and from them to its items);
--   * a run target the queue references cannot be re-keyed or truncated away.
-- The parents' side checks with the latest committed rows only at READ COMMITTED (what
-- analysisq and psql use): PL/pgSQL has no access to the RI triggers' cross-check snapshot,
-- so a delete of a referenced parent at a higher isolation level is refused with a clear error
-- instead of risking an orphan. analysis_queue_submission_id_fkey stays a foreign key: its
-- check returns at once for the fill's NULLs, and replacing it would move a per-row check
-- into every batch claim's UPDATE.

ALTER TABLE analysis_queue
    DROP CONSTRAINT analysis_queue_prompt_tracking_id_fkey,
    DROP CONSTRAINT analysis_queue_run_id_target_fkey;

-- The parents' guards run at READ COMMITTED only (see above).
CREATE FUNCTION analysisq_guard_needs_read_committed(p_what text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION '% needs READ COMMITTED isolation, this transaction is %', p_what,
                        upper(current_setting('transaction_isolation'))
            USING ERRCODE = 'feature_not_supported',
                  HINT = 'the queue''s references are checked against the latest committed '
                         'rows (migration 0011); run it in a READ COMMITTED transaction';
    END IF;
END
$$;

-- What orders the queue's inserts against deletes of prompts at READ COMMITTED: a
-- transaction adding queue rows holds this lock shared from its check to its end; one
-- deleting or re-keying prompts takes it exclusively before its own check. So either the
-- deleter waits for the inserter's commit and then sees its rows, or the inserter waits for
-- the deleter's and then sees the prompt gone. One lock per transaction where the RI check
-- locked every referenced prompt FOR KEY SHARE: for a 1M-prompt fill that was 1M row locks
-- (docs/benchmarks.md, "fill"). Transaction-scoped, so it works behind a pooler in
-- transaction mode. Key: the first 8 bytes of sha256('analysisq.queue_prompt_refs') as a
-- signed bigint.
CREATE FUNCTION analysisq_prompt_refs_lock(p_exclusive boolean) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF p_exclusive THEN
        PERFORM pg_advisory_xact_lock(-6363128512641802598);
    ELSE
        PERFORM pg_advisory_xact_lock_shared(-6363128512641802598);
    END IF;
END
$$;

-- After each INSERT into the queue: every new row's run target and prompt exist. The run
-- targets are a few per statement and are locked FOR KEY SHARE as the RI check locks them
-- (a concurrent delete of one waits for this transaction, then deletes its items too). The
-- prompts are checked by one anti-join after the lock above, at READ COMMITTED; at a higher
-- isolation level the transaction's snapshot may predate a delete, so the prompts are locked
-- FOR KEY SHARE instead (a prompt deleted after the snapshot is a serialization failure).
CREATE FUNCTION analysisq_queue_refs_inserted() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    bad record;
    missing bigint;
BEGIN
    PERFORM FROM run_targets t
    WHERE (t.run_id, t.target) IN (SELECT DISTINCT i.run_id, i.target FROM inserted i)
    FOR KEY SHARE OF t;
    SELECT i.run_id, i.target INTO bad
    FROM (SELECT DISTINCT run_id, target FROM inserted) i
    WHERE NOT EXISTS (SELECT FROM run_targets t WHERE t.run_id = i.run_id AND t.target = i.target)
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'insert into analysis_queue: run % has no target % (run_targets)',
                        bad.run_id, bad.target
            USING ERRCODE = 'foreign_key_violation', TABLE = 'analysis_queue',
                  CONSTRAINT = 'analysis_queue_run_id_target_fkey';
    END IF;
    IF current_setting('transaction_isolation') = 'read committed' THEN
        PERFORM analysisq_prompt_refs_lock(false);
    ELSE
        PERFORM FROM prompts p WHERE p.id IN (SELECT prompt_tracking_id FROM inserted)
        FOR KEY SHARE OF p;
    END IF;
    -- a statement of its own: at READ COMMITTED its snapshot is taken after the lock
    SELECT i.prompt_tracking_id INTO missing FROM inserted i
    WHERE NOT EXISTS (SELECT FROM prompts p WHERE p.id = i.prompt_tracking_id)
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'insert into analysis_queue: prompt id % does not exist (prompts.id)',
                        missing
            USING ERRCODE = 'foreign_key_violation', TABLE = 'analysis_queue',
                  CONSTRAINT = 'analysis_queue_prompt_tracking_id_fkey';
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER analysis_queue_refs_inserted
    AFTER INSERT ON analysis_queue REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION analysisq_queue_refs_inserted();

-- An UPDATE that moves a queue row to another prompt, run or target (nothing in analysisq
-- does): the new ones must exist, checked per row (a trigger with a column list cannot have
-- a transition table, and the claims' UPDATEs, which never set these columns, skip it).
CREATE FUNCTION analysisq_queue_refs_updated() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM FROM run_targets t WHERE t.run_id = NEW.run_id AND t.target = NEW.target
    FOR KEY SHARE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'update of analysis_queue item %: run % has no target % (run_targets)',
                        NEW.id, NEW.run_id, NEW.target
            USING ERRCODE = 'foreign_key_violation', TABLE = 'analysis_queue',
                  CONSTRAINT = 'analysis_queue_run_id_target_fkey';
    END IF;
    PERFORM FROM prompts p WHERE p.id = NEW.prompt_tracking_id FOR KEY SHARE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'update of analysis_queue item %: prompt id % does not exist (prompts.id)',
                        NEW.id, NEW.prompt_tracking_id
            USING ERRCODE = 'foreign_key_violation', TABLE = 'analysis_queue',
                  CONSTRAINT = 'analysis_queue_prompt_tracking_id_fkey';
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER analysis_queue_refs_updated
    AFTER UPDATE OF run_id, prompt_tracking_id, target ON analysis_queue
    FOR EACH ROW
    WHEN (OLD.run_id IS DISTINCT FROM NEW.run_id
          OR OLD.prompt_tracking_id IS DISTINCT FROM NEW.prompt_tracking_id
          OR OLD.target IS DISTINCT FROM NEW.target)
    EXECUTE FUNCTION analysisq_queue_refs_updated();

-- Prompts deleted by a statement: none may still be referenced by the queue (unless the same
-- statement left a prompt with that id, as NO ACTION allows). One scan of the queue per
-- statement (no index leads with prompt_tracking_id; the foreign key scanned it per row).
CREATE FUNCTION analysisq_prompts_deleted() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    bad record;
BEGIN
    IF NOT EXISTS (SELECT FROM gone) THEN
        RETURN NULL;
    END IF;
    PERFORM analysisq_guard_needs_read_committed('deleting prompts');
    PERFORM analysisq_prompt_refs_lock(true);
    SELECT g.id, g.external_id INTO bad FROM gone g
    WHERE EXISTS (SELECT FROM analysis_queue q WHERE q.prompt_tracking_id = g.id)
      AND NOT EXISTS (SELECT FROM prompts p WHERE p.id = g.id)
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'delete from prompts: prompt % (id %) is still in the queue of a run',
                        bad.external_id, bad.id
            USING ERRCODE = 'foreign_key_violation', TABLE = 'prompts',
                  CONSTRAINT = 'analysis_queue_prompt_tracking_id_fkey',
                  HINT = 'deactivate it instead (active = false), or delete those runs first';
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER prompts_deleted
    AFTER DELETE ON prompts REFERENCING OLD TABLE AS gone
    FOR EACH STATEMENT EXECUTE FUNCTION analysisq_prompts_deleted();

-- A prompt's id changed (UPDATE prompts SET id = DEFAULT): the old id may not be referenced.
CREATE FUNCTION analysisq_prompts_rekeyed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM analysisq_guard_needs_read_committed('changing a prompt''s id');
    PERFORM analysisq_prompt_refs_lock(true);
    IF EXISTS (SELECT FROM analysis_queue q WHERE q.prompt_tracking_id = OLD.id)
       AND NOT EXISTS (SELECT FROM prompts p WHERE p.id = OLD.id) THEN
        RAISE EXCEPTION 'update of prompts: prompt % (id %) is still in the queue of a run',
                        OLD.external_id, OLD.id
            USING ERRCODE = 'foreign_key_violation', TABLE = 'prompts',
                  CONSTRAINT = 'analysis_queue_prompt_tracking_id_fkey';
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER prompts_rekeyed
    AFTER UPDATE OF id ON prompts
    FOR EACH ROW WHEN (OLD.id IS DISTINCT FROM NEW.id)
    EXECUTE FUNCTION analysisq_prompts_rekeyed();

-- Run targets deleted by a statement (directly, or by deleting their run): their queue rows
-- go with them.
CREATE FUNCTION analysisq_run_targets_deleted() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT FROM gone) THEN
        RETURN NULL;
    END IF;
    PERFORM analysisq_guard_needs_read_committed('deleting run targets');
    DELETE FROM analysis_queue q USING gone g
    WHERE q.run_id = g.run_id AND q.target = g.target;
    RETURN NULL;
END
$$;

CREATE TRIGGER run_targets_deleted
    AFTER DELETE ON run_targets REFERENCING OLD TABLE AS gone
    FOR EACH STATEMENT EXECUTE FUNCTION analysisq_run_targets_deleted();

-- A run target re-keyed: its old key may not be referenced (it was ON UPDATE NO ACTION).
CREATE FUNCTION analysisq_run_targets_rekeyed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM analysisq_guard_needs_read_committed('changing a run target''s key');
    IF EXISTS (SELECT FROM analysis_queue q
               WHERE q.run_id = OLD.run_id AND q.target = OLD.target)
       AND NOT EXISTS (SELECT FROM run_targets t
                       WHERE t.run_id = OLD.run_id AND t.target = OLD.target) THEN
        RAISE EXCEPTION 'update of run_targets: target % of run % still has queue rows',
                        OLD.target, OLD.run_id
            USING ERRCODE = 'foreign_key_violation', TABLE = 'run_targets',
                  CONSTRAINT = 'analysis_queue_run_id_target_fkey';
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER run_targets_rekeyed
    AFTER UPDATE OF run_id, target ON run_targets
    FOR EACH ROW WHEN (OLD.run_id IS DISTINCT FROM NEW.run_id OR OLD.target IS DISTINCT FROM NEW.target)
    EXECUTE FUNCTION analysisq_run_targets_rekeyed();

-- TRUNCATE fires no row trigger: truncating prompts is refused unless the queue is empty once
-- the statement is done (TRUNCATE prompts, analysis_queue together is fine: the check runs
-- after every table of the statement was emptied). run_targets needs no such guard: the
-- foreign keys batch_submissions -> run_targets and analysis_queue -> batch_submissions
-- already make TRUNCATE run_targets take the queue with it (CASCADE) or fail.
CREATE FUNCTION analysisq_prompts_truncated() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM analysisq_guard_needs_read_committed('truncating prompts');
    IF EXISTS (SELECT FROM analysis_queue) THEN
        RAISE EXCEPTION 'truncate prompts: the queue still references them'
            USING ERRCODE = 'foreign_key_violation', TABLE = 'prompts',
                  HINT = 'truncate analysis_queue in the same statement';
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER prompts_truncated
    AFTER TRUNCATE ON prompts
    FOR EACH STATEMENT EXECUTE FUNCTION analysisq_prompts_truncated();

-- The status index held every row (status, updated_at): one entry per fill row, claim,
-- heartbeat and completion. What reads it: the seed's and `analysisq failed`'s newest failed
-- items (status = 'failed' ORDER BY updated_at DESC LIMIT) and the failed-error summaries;
-- the stuck queries (status = 'processing') read analysis_queue_lease_idx, which holds the
-- processing rows; the counts by status read the whole table either way. Built once, from a
-- scan of the table (no rewrite); writes wait for the build.
DROP INDEX analysis_queue_status_idx;
CREATE INDEX analysis_queue_status_idx ON analysis_queue (updated_at) WHERE status = 'failed';

-- 0013_fill_function: the fill as one function, a plain INSERT for what a run lacks and no
-- per-row reference check for its rows. A 1M-item fill spent ~3.4 s of ~15 s in ON
-- CONFLICT's speculative insertion and ~3.8 s in analysisq_queue_refs_inserted's anti-join
-- of the 1M new rows with prompts (docs/benchmarks.md, "fill"). The guarantees are
-- unchanged: a queue row's prompt and run target exist (the function checks the targets and
-- takes the prompts' lock before the statement that selects its rows from prompts; every
-- other INSERT is checked by the trigger as before), and a repeated or concurrent fill adds
-- exactly what is missing (the unique index, then ON CONFLICT on a unique violation).

-- The fill (migration 0013): every selected prompt x every target of the run, once. A first
-- fill is a plain INSERT of what the run does not have yet (an anti-join against the run's
-- rows, empty for a first fill); the unique index is the backstop: should a concurrent fill
-- commit the same rows first, the INSERT fails with a unique violation and is redone as
-- INSERT ... ON CONFLICT DO NOTHING, so a repeated or concurrent fill still adds exactly
-- what is missing (ON CONFLICT's speculative insertion cost ~3.4 s of a 1M fill).
-- The references need no check per row here: the run's targets are checked and locked
-- below, and every row is selected from prompts by a statement whose snapshot is taken after
-- the prompts' lock (at READ COMMITTED), so no delete of one of them can have committed
-- unseen. analysisq_queue_refs_inserted recognises this function's statements by the call
-- stack and skips its check for them; every INSERT into analysis_queue written here must
-- keep selecting its rows from prompts after that lock.
CREATE FUNCTION analysisq_fill_run(p_run_id text, p_targets text[], p_tags text[],
                                   p_ids text[]) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    missing text;
    n bigint;
BEGIN
    PERFORM FROM run_targets t WHERE t.run_id = p_run_id AND t.target = ANY (p_targets)
    FOR KEY SHARE OF t;
    SELECT x.target INTO missing FROM unnest(p_targets) AS x(target)
    WHERE NOT EXISTS (SELECT FROM run_targets t
                      WHERE t.run_id = p_run_id AND t.target = x.target)
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'insert into analysis_queue: run % has no target % (run_targets)',
                        p_run_id, missing
            USING ERRCODE = 'foreign_key_violation', TABLE = 'analysis_queue',
                  CONSTRAINT = 'analysis_queue_run_id_target_fkey';
    END IF;
    IF current_setting('transaction_isolation') = 'read committed' THEN
        PERFORM analysisq_prompt_refs_lock(false);
    END IF;
    BEGIN
        INSERT INTO analysis_queue (run_id, prompt_tracking_id, target)
        SELECT p_run_id, p.id, t.target
        FROM prompts p
        CROSS JOIN unnest(p_targets) AS t(target)
        WHERE (CASE WHEN cardinality(p_ids) > 0 THEN p.external_id = ANY (p_ids)
                    ELSE p.active END)
          AND (cardinality(p_tags) = 0 OR p.tags && p_tags)
          AND NOT EXISTS (SELECT FROM analysis_queue q
                          WHERE q.run_id = p_run_id AND q.prompt_tracking_id = p.id
                            AND q.target = t.target)
        ORDER BY p.id, t.target;
        GET DIAGNOSTICS n = ROW_COUNT;
    EXCEPTION WHEN unique_violation THEN
        INSERT INTO analysis_queue (run_id, prompt_tracking_id, target)
        SELECT p_run_id, p.id, t.target
        FROM prompts p
        CROSS JOIN unnest(p_targets) AS t(target)
        WHERE (CASE WHEN cardinality(p_ids) > 0 THEN p.external_id = ANY (p_ids)
                    ELSE p.active END)
          AND (cardinality(p_tags) = 0 OR p.tags && p_tags)
        ORDER BY p.id, t.target
        ON CONFLICT (run_id, prompt_tracking_id, target) DO NOTHING;
        GET DIAGNOSTICS n = ROW_COUNT;
    END;
    RETURN n;
END
$$;

-- The reference check, as in 0011, recognising analysisq_fill_run's statements.
-- After each INSERT into the queue: every new row's run target and prompt exist. The run
-- targets are a few per statement and are locked FOR KEY SHARE as the RI check locks them
-- (a concurrent delete of one waits for this transaction, then deletes its items too). The
-- prompts are checked by one anti-join after the lock above, at READ COMMITTED; at a higher
-- isolation level the transaction's snapshot may predate a delete, so the prompts are locked
-- FOR KEY SHARE instead (a prompt deleted after the snapshot is a serialization failure).
-- Skipped for analysisq_fill_run's own statements at READ COMMITTED (migration 0013), which
-- select every row from prompts after that lock and check the targets first: the call stack
-- proves it, not a setting a client could change. The innermost caller frame must be that
-- function at one of its SQL statements and nothing may run outside it (the last line of the
-- context is written by the outermost frame, so no statement text can forge it), and no
-- other trigger may sit in between (pg_trigger_depth() = 1). Any other INSERT, from any
-- client or function, is checked in full.
CREATE OR REPLACE FUNCTION analysisq_queue_refs_inserted() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    bad record;
    missing bigint;
    stack text;
BEGIN
    GET DIAGNOSTICS stack = PG_CONTEXT;
    IF pg_trigger_depth() = 1
       AND current_setting('transaction_isolation') = 'read committed'
       AND stack ~ ('^PL/pgSQL function analysisq_queue_refs_inserted\(\) line [0-9]+ at '
                    'GET DIAGNOSTICS\nSQL statement "INSERT INTO analysis_queue [^"]*"\n'
                    'PL/pgSQL function analysisq_fill_run\(text,text\[\],text\[\],text\[\]\) '
                    'line [0-9]+ at SQL statement$') THEN
        RETURN NULL;
    END IF;
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


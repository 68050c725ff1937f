-- 0010_fail_exhausted: one place for "no attempt left".
--
-- A claim that finds waiting items with no attempt left (maxAttempts was lowered after they
-- were last tried) ends them failed for good instead of leaving them waiting for ever. Both
-- claims, the sync path's complete_and_claim and batch_claim, call this function with the
-- ids their scan locked, so the rule and its message are written once. PL/pgSQL, so that
-- its statement's plan is cached per session, and an empty array (nearly every claim)
-- returns before any statement runs: the hot path pays one function call.

CREATE FUNCTION fail_exhausted(p_ids bigint[]) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    failed integer;
BEGIN
    IF coalesce(cardinality(p_ids), 0) = 0 THEN
        RETURN 0;
    END IF;
    UPDATE analysis_queue q SET
        status = 'failed', next_attempt_at = NULL, updated_at = now(),
        error_class = coalesce(q.error_class, 'transient'),
        error_message = format('gave up after %s attempts: %s', q.attempts,
                               coalesce(q.error_message, 'maxAttempts was lowered'))
    WHERE q.id = ANY (p_ids);
    GET DIAGNOSTICS failed = ROW_COUNT;
    RETURN failed;
END
$$;

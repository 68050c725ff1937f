-- 0007_live_claims: faults users meet (issue 9), on top of 0006's stuck reset.
-- cleanup_stuck_queue_items poisons an item on the lost leases that point at it (lone_losses)
-- and gains p_live_tokens (a worker never resets the claims it still
-- works on) and spares, for one lease after a server (re)start, items last renewed shortly
-- before the start (their workers could not renew them while the server was down).
-- Items waiting inside a provider batch are still never reset (0006). The seed's call,
-- SELECT * FROM cleanup_stuck_queue_items(), is unchanged; the two-argument version is
-- dropped so that exactly one function of the name remains.

DROP FUNCTION cleanup_stuck_queue_items(text, interval);

-- The lost leases that point at the item itself: poison is judged on these, not on every
-- lease its worker lost with it.
ALTER TABLE analysis_queue ADD COLUMN lone_losses integer NOT NULL DEFAULT 0
    CHECK (lone_losses >= 0 AND lone_losses <= lease_losses);

-- The claim's scan for suspects (items that lost a lease): few rows, so that looking for
-- them costs nothing when there are none (the claim index would walk every due item).
CREATE INDEX analysis_queue_suspect_idx
    ON analysis_queue (run_id, (status = 'failed'), next_attempt_at)
    WHERE status IN ('pending', 'failed') AND next_attempt_at IS NOT NULL AND lease_losses > 0;

-- The seed's SQL function, same name and meaning: put items stuck in 'processing' back in the
-- queue. Stuck = lease expired, or (for rows without a live heartbeat) not updated for
-- p_stuck_after. An item that keeps killing its worker fails for good as poison instead of
-- looping: a lost lease is evidence against an item when the dead worker held it alone, or
-- held it as its one suspect (an item that lost a lease before; the claim hands a worker one
-- at a time); its max_lease_losses-th piece of evidence poisons it. An item that merely died
-- with its batch-mates becomes a suspect, no more. Callable by people, pg_cron, the worker
-- at start and the operator.
-- Two kinds of item are not stuck: those whose claim token is in p_live_tokens (a worker
-- resetting its own run passes the claims it still works on), and, for one lease after the
-- server (re)started, those last renewed shortly before it started: their owners could not
-- renew them while the server was down and get the time to do it now.
CREATE FUNCTION cleanup_stuck_queue_items(
    p_run_id text DEFAULT NULL,
    p_stuck_after interval DEFAULT interval '15 minutes',
    p_live_tokens uuid[] DEFAULT '{}'
) RETURNS TABLE (reset_count integer, poisoned_count integer)
LANGUAGE sql AS $$
    WITH stuck AS (
        SELECT q.id, q.lease_owner, q.lease_losses > 0 AS suspect,
               q.lone_losses, r.max_lease_losses
        FROM analysis_queue q
        JOIN analysis_runs r ON r.id = q.run_id
        WHERE q.status = 'processing'
          AND (p_run_id IS NULL OR q.run_id = p_run_id)
          AND (q.lease_expires_at < now() OR q.updated_at < now() - p_stuck_after)
          -- items waiting inside a provider batch belong to their submission, whose own
          -- lease is what a dead worker loses (another worker adopts it): never reset here
          AND q.submission_id IS NULL
          AND q.claim_token <> ALL (p_live_tokens)
          AND NOT (pg_postmaster_start_time() > now() - make_interval(secs => r.lease_seconds)
                   AND q.updated_at < pg_postmaster_start_time()
                   AND q.updated_at > pg_postmaster_start_time() - p_stuck_after)
        ORDER BY q.id
        FOR UPDATE OF q SKIP LOCKED
    ), held AS (
        SELECT lease_owner, count(*) AS n FROM stuck GROUP BY lease_owner
    ), judged AS (
        SELECT s.id, s.suspect OR h.n = 1 AS lone,
               (s.suspect OR h.n = 1) AND s.lone_losses + 1 >= s.max_lease_losses AS poison
        FROM stuck s JOIN held h ON h.lease_owner = s.lease_owner
    ), reset AS (
        UPDATE analysis_queue q SET
            status = CASE WHEN s.poison THEN 'failed' ELSE 'pending' END,
            -- the lost attempt is not counted: the item did not get an answer
            attempts = greatest(q.attempts - 1, 0),
            lease_losses = q.lease_losses + 1,
            lone_losses = q.lone_losses + s.lone::integer,
            error_class = CASE WHEN s.poison THEN 'poison' ELSE 'lease_lost' END,
            error_message = CASE WHEN s.poison
                THEN format('poison: lease lost %s times (worker %s died or hung each time)',
                            q.lease_losses + 1, q.lease_owner)
                ELSE format('lease lost by worker %s; requeued', q.lease_owner) END,
            -- '-infinity': rescued items go to the head of the queue, not behind the backlog;
            -- the claim hands a worker at most one item that lost a lease (see `claim`)
            next_attempt_at = CASE WHEN s.poison THEN NULL ELSE '-infinity'::timestamptz END,
            lease_owner = NULL, lease_expires_at = NULL, claim_token = NULL,
            updated_at = now()
        FROM judged s
        WHERE q.id = s.id
        RETURNING s.poison
    )
    SELECT (count(*) FILTER (WHERE NOT poison))::integer,
           (count(*) FILTER (WHERE poison))::integer
    FROM reset
$$;

-- 0006_batch_submissions: provider Batch APIs (targets[].mode: batch).
--
-- A submission table with its own lease; items inside a batch point at their submission and
-- are left alone by cleanup_stuck_queue_items (their submission is adopted instead); results
-- record whether they were answered through a batch.

-- A provider batch (targets[].mode: batch): recorded as an intent, with its items, before it
-- is sent, so that a worker that dies between the POST and the commit leaves a row another
-- worker reconciles with the provider instead of paying for a second batch. Its own lease:
-- a dead owner's submission is adopted and polled by another worker, never submitted twice.
--   intent -> submitted  the provider accepted it (provider_batch_id known)
--   intent -> done       nothing was sent (refused, or the run stopped first)
--   submitted -> done    its results were ingested; items without one went back unspent
CREATE DOMAIN submission_state AS text CHECK (VALUE IN ('intent', 'submitted', 'done'));

CREATE TABLE batch_submissions (
    id                bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id            text        NOT NULL,
    target            text        NOT NULL,
    state             submission_state NOT NULL DEFAULT 'intent',
    provider_batch_id text        UNIQUE,
    provider_status   text,
    item_count        integer     NOT NULL CHECK (item_count > 0),
    request_counts    jsonb       NOT NULL DEFAULT '{}',
    lease_owner       text,
    lease_expires_at  timestamptz,
    poll_at           timestamptz NOT NULL DEFAULT now(),
    cancel_reason     text,
    outcome           text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    submitted_at      timestamptz,
    finished_at       timestamptz,
    updated_at        timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (run_id, target) REFERENCES run_targets (run_id, target) ON DELETE CASCADE,
    CONSTRAINT intent_has_no_batch CHECK (state <> 'intent' OR provider_batch_id IS NULL),
    CONSTRAINT submitted_has_batch CHECK (state <> 'submitted' OR provider_batch_id IS NOT NULL),
    CONSTRAINT done_has_time CHECK ((state = 'done') = (finished_at IS NOT NULL)),
    CONSTRAINT open_has_owner CHECK (
        (state = 'done') = (lease_owner IS NULL AND lease_expires_at IS NULL)
    )
);
-- Open submissions of a run, by when their lease ends (adoption, status).
CREATE INDEX batch_submissions_open_idx ON batch_submissions (run_id, lease_expires_at)
    WHERE state <> 'done';

-- Items inside a provider batch name their submission (and are processing, with a claim).
ALTER TABLE analysis_queue
    ADD COLUMN submission_id bigint REFERENCES batch_submissions (id) ON DELETE SET NULL,
    ADD CONSTRAINT submission_only_while_processing
        CHECK (submission_id IS NULL OR status = 'processing');
CREATE INDEX analysis_queue_submission_idx ON analysis_queue (submission_id)
    WHERE submission_id IS NOT NULL;

-- Answered through a provider batch (priced at the batch discount).
ALTER TABLE analysis_results ADD COLUMN via_batch boolean NOT NULL DEFAULT false;

CREATE OR REPLACE FUNCTION cleanup_stuck_queue_items(
    p_run_id text DEFAULT NULL,
    p_stuck_after interval DEFAULT interval '15 minutes'
) RETURNS TABLE (reset_count integer, poisoned_count integer)
LANGUAGE sql AS $$
    WITH stuck AS (
        SELECT q.id, q.lease_losses + 1 >= r.max_lease_losses AS poison
        FROM analysis_queue q
        JOIN analysis_runs r ON r.id = q.run_id
        WHERE q.status = 'processing'
          AND (p_run_id IS NULL OR q.run_id = p_run_id)
          AND (q.lease_expires_at < now() OR q.updated_at < now() - p_stuck_after)
          -- items waiting inside a provider batch belong to their submission, whose own
          -- lease is what a dead worker loses (another worker adopts it): never reset here
          AND q.submission_id IS NULL
        ORDER BY q.id
        FOR UPDATE OF q SKIP LOCKED
    ), reset AS (
        UPDATE analysis_queue q SET
            status = CASE WHEN s.poison THEN 'failed' ELSE 'pending' END,
            -- the lost attempt is not counted: the item did not get an answer
            attempts = greatest(q.attempts - 1, 0),
            lease_losses = q.lease_losses + 1,
            error_class = CASE WHEN s.poison THEN 'poison' ELSE 'lease_lost' END,
            error_message = CASE WHEN s.poison
                THEN format('poison: lease lost %s times (worker %s died or hung each time)',
                            q.lease_losses + 1, q.lease_owner)
                ELSE format('lease lost by worker %s; requeued', q.lease_owner) END,
            -- '-infinity': rescued items go to the head of the queue, not behind the backlog
            next_attempt_at = CASE WHEN s.poison THEN NULL ELSE '-infinity'::timestamptz END,
            lease_owner = NULL, lease_expires_at = NULL, claim_token = NULL,
            updated_at = now()
        FROM stuck s
        WHERE q.id = s.id
        RETURNING s.poison
    )
    SELECT (count(*) FILTER (WHERE NOT poison))::integer,
           (count(*) FILTER (WHERE poison))::integer
    FROM reset
$$;

-- 0009_claim_function: the worker's complete-and-claim statement becomes a function, so that
-- PostgreSQL keeps its plan. Sent as a statement it was parsed and planned on every execution
-- behind a pooler in transaction mode (no prepared statement survives a transaction there),
-- which cost the server 3.6x the CPU of a direct connection per batch (docs/benchmarks.md).
-- The statement is unchanged but for its exhausted step, which calls fail_exhausted (also
-- used by batch_claim); sql/queries.sql's complete_and_claim calls the function.

-- One place for "no attempt left": waiting items a claim found with no attempt left
-- (maxAttempts was lowered after they were last tried) end failed for good. Both claims, the
-- sync path's analysisq_complete_and_claim below and queries.sql's batch_claim, call it with
-- the ids their scan locked. An empty array (nearly every claim) returns before any
-- statement runs: the hot path pays one function call.
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

-- The worker's one statement per batch (``queue.items.complete_and_claim``): write a finished
-- batch and claim the slots it frees, in one round trip and one transaction. Either half may
-- be empty: no answers = a plain claim (``items.claim``), p_limit = 0 = a plain completion
-- (``items.complete``).
-- Completion (p_ids..p_latency_ms one array each, p_via_batch: answered through a provider
-- batch): fenced, the status flips and the result row is written only for claims that are
-- still the writer's; UNIQUE (queue_id) on results makes a second result for an item
-- impossible.
-- Claim: up to p_limit items of run p_run_id for worker p_worker with a lease of
-- p_lease_seconds, of which at most p_max_suspects (NULL = any number) lost a lease before,
-- skipping the targets p_skip_targets (those in mode batch). The run's maxAttempts is read
-- here, from the database, so a lowered maximum applies at once to every worker, old or new.
-- Rows with written = true are the completed ids; the others are the new claims. The UPDATEs
-- of analysis_queue touch disjoint rows: `done` only items processing under the writer's
-- token, the claim's only waiting ones.
-- A PL/pgSQL function with its generic plan forced, not a statement sent each time: the
-- server plans it once per connection and keeps the plan, also behind a pooler in transaction
-- mode, where no prepared statement survives and a statement sent as such was parsed and
-- planned on every execution (planning cost as much as running it: docs/benchmarks.md). The
-- generic plan is the right one: every scan is an index scan bounded by the run and the
-- LIMIT, whatever the values.
CREATE FUNCTION analysisq_complete_and_claim(
    p_ids bigint[], p_tokens uuid[], p_models text[], p_response_texts text[], p_parsed text[],
    p_tokens_in integer[], p_tokens_out integer[], p_latency_ms double precision[],
    p_via_batch boolean, p_run_id text, p_limit bigint, p_worker text,
    p_lease_seconds double precision, p_max_suspects bigint, p_skip_targets text[]
) RETURNS TABLE (
    written boolean, id bigint, claim_token uuid, run_id text, prompt_tracking_id bigint,
    target text, attempts integer, deferrals integer, lease_losses integer,
    max_attempts integer, external_id text, text text
)
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH input AS (
        SELECT * FROM unnest(p_ids, p_tokens, p_models, p_response_texts, p_parsed,
                             p_tokens_in, p_tokens_out, p_latency_ms)
            AS i(id, token, model, response_text, parsed, tokens_in, tokens_out, latency_ms)
    ), done AS (
        UPDATE analysis_queue q SET
            status = 'completed', completed_at = now(), updated_at = now(),
            error_class = NULL, error_message = NULL,
            lease_owner = NULL, lease_expires_at = NULL, claim_token = NULL, submission_id = NULL
        FROM input i
        -- By key, and the token is the fence: a claim token exists exactly while the item
        -- is processing (CHECK processing_has_lease), so no status condition is needed, and
        -- none is written: with one the generic plan read every processing item by the
        -- status index when the statistics had seen few (a batch reading what all workers
        -- hold).
        WHERE q.id = ANY (p_ids) AND q.id = i.id AND q.claim_token = i.token
        RETURNING q.id, q.run_id, q.prompt_tracking_id, q.target, q.attempts
    ), healthy AS (
        -- an answer: the target works, so a streak of target faults (the breaker) is broken
        UPDATE run_targets t SET fault = NULL, fault_streak = 0, fault_items = '{}'
        FROM (SELECT DISTINCT run_id, target FROM done) d
        WHERE t.run_id = d.run_id AND t.target = d.target AND t.fault IS NOT NULL
          AND t.paused_at IS NULL
    ), saved AS (
        INSERT INTO analysis_results (queue_id, run_id, prompt_tracking_id, target, model,
                                      response_text, parsed, tokens_in, tokens_out, latency_ms,
                                      attempt, via_batch)
        SELECT d.id, d.run_id, d.prompt_tracking_id, d.target, i.model, i.response_text,
               i.parsed::jsonb, i.tokens_in, i.tokens_out, i.latency_ms, d.attempts, p_via_batch
        FROM done d JOIN input i ON i.id = d.id
        RETURNING queue_id
    ), open AS (
        -- Whether any target is left to claim for. Targets in mode batch are claimed by
        -- batch_claim only; a target whose rate pool a provider's Retry-After blocks is not
        -- claimed for until the block ends: its items stay in the queue instead of waiting in a
        -- worker that holds their leases (an idle claim is exposed to that worker's death, which
        -- the stuck reset charges to the items it held). With no target left the scans below do
        -- not run at all (rather than walk every due item of the blocked targets).
        SELECT EXISTS (
            SELECT 1 FROM run_targets t JOIN rate_pools rp ON rp.name = t.pool
            WHERE t.run_id = p_run_id AND t.target <> ALL (p_skip_targets)
              AND rp.blocked_until <= now()
        ) AS targets_left
    ), suspects AS (
        -- Items that lost a lease: a worker holding one died or hung. A worker takes at most one
        -- at a time (it passes p_max_suspects = 0 while it holds one), so a prompt that kills its
        -- worker
        -- takes only fresh batch-mates down with it, once, and is poisoned alone. Few items are
        -- suspects: analysis_queue_suspect_idx holds only them.
        SELECT q.id, (q.status = 'failed') AS retry, q.next_attempt_at AS due, q.attempts
        FROM analysis_queue q
        WHERE q.run_id = p_run_id
          AND q.status IN ('pending', 'failed')
          AND q.next_attempt_at IS NOT NULL
          AND q.next_attempt_at <= now()
          AND q.lease_losses > 0
          -- the targets to serve, not `q.target <> ALL (p_skip_targets)`: the planner rates
          -- that near 0 rows for a run of one or a few targets and, in a generic plan, trades
          -- the index's order for a full scan and a sort
          AND q.target = ANY (ARRAY(SELECT t.target FROM run_targets t
                                    WHERE t.run_id = p_run_id AND t.target <> ALL (p_skip_targets)))
          -- the item's pool is not blocked (see `open`); a scalar subquery, evaluated for the
          -- rows the index scan reaches, keeps the scan in index order up to the LIMIT
          AND (SELECT rp.blocked_until FROM run_targets t JOIN rate_pools rp ON rp.name = t.pool
               WHERE t.run_id = q.run_id AND t.target = q.target) <= now()
          AND (SELECT targets_left FROM open)
        ORDER BY (q.status = 'failed'), q.next_attempt_at
        LIMIT least(p_limit, p_max_suspects)
        FOR UPDATE OF q SKIP LOCKED
    ), fresh AS (
        -- pending items first, then failed items whose backoff elapsed; next_attempt_at also
        -- defers pending items released after a 429, and parks the items of a paused target at
        -- 'infinity', so this scan needs no other condition and walks analysis_queue_claim_idx
        -- in order, stopping at the LIMIT.
        SELECT q.id, (q.status = 'failed') AS retry, q.next_attempt_at AS due, q.attempts
        FROM analysis_queue q
        WHERE q.run_id = p_run_id
          AND q.status IN ('pending', 'failed')
          AND q.next_attempt_at IS NOT NULL
          AND q.next_attempt_at <= now()
          AND q.lease_losses = 0
          -- the targets to serve, not `q.target <> ALL (p_skip_targets)`: the planner rates
          -- that near 0 rows for a run of one or a few targets and, in a generic plan, trades
          -- the index's order for a full scan and a sort
          AND q.target = ANY (ARRAY(SELECT t.target FROM run_targets t
                                    WHERE t.run_id = p_run_id AND t.target <> ALL (p_skip_targets)))
          -- the item's pool is not blocked (see `open`); a scalar subquery, evaluated for the
          -- rows the index scan reaches, keeps the scan in index order up to the LIMIT
          AND (SELECT rp.blocked_until FROM run_targets t JOIN rate_pools rp ON rp.name = t.pool
               WHERE t.run_id = q.run_id AND t.target = q.target) <= now()
          AND (SELECT targets_left FROM open)
        ORDER BY (q.status = 'failed'), q.next_attempt_at
        LIMIT p_limit - (SELECT count(*) FROM suspects)
        -- rows another worker is claiming are skipped, not waited for
        FOR UPDATE OF q SKIP LOCKED
    ), candidates AS (
        -- the scans' own rows, not joined back to analysis_queue: LIMIT p_limit - count(*) is no
        -- constant, the planner takes it for 10% of the queue and would hash a scan of it all
        SELECT c.id, c.n, c.retry, c.due, c.attempts >= r.max_attempts AS exhausted, r.max_attempts
        FROM (SELECT id, 0 AS n, retry, due, attempts FROM suspects
              UNION ALL SELECT id, 1, retry, due, attempts FROM fresh) c
        CROSS JOIN analysis_runs r
        WHERE r.id = p_run_id
    ), exhausted AS (
        -- Waiting items with no attempt left end here, failed for good (fail_exhausted,
        -- shared with batch_claim; free when there is none)
        SELECT fail_exhausted(ARRAY(SELECT c.id FROM candidates c WHERE c.exhausted)) AS failed
    ), claimed AS (
        UPDATE analysis_queue q SET
            status = 'processing',
            attempts = q.attempts + 1,
            lease_owner = p_worker,
            lease_expires_at = now() + make_interval(secs => p_lease_seconds),
            -- the fence: every later write for this claim must present this token
            claim_token = gen_random_uuid(),
            next_attempt_at = NULL,
            updated_at = now()
        FROM prompts p, analysis_runs r
        -- an id array, not a join with `candidates`, for the same reason as there
        WHERE q.id = ANY (ARRAY(SELECT c.id FROM candidates c WHERE NOT c.exhausted))
          AND p.id = q.prompt_tracking_id AND r.id = q.run_id
          -- a condition on no row: evaluated once, before the scan, so `exhausted` runs even
          -- when nothing is left to claim (a SELECT in WITH runs only where it is read)
          AND (SELECT failed FROM exhausted) IS NOT NULL
        RETURNING q.id, q.claim_token, q.run_id, q.prompt_tracking_id, q.target, q.attempts,
                  q.deferrals, q.lease_losses, r.max_attempts, p.external_id, p.text
    )
    SELECT true AS written, s.queue_id AS id, NULL::uuid AS claim_token, NULL::text AS run_id,
           NULL::bigint AS prompt_tracking_id, NULL::text AS target, NULL::integer AS attempts,
           NULL::integer AS deferrals, NULL::integer AS lease_losses,
           NULL::integer AS max_attempts, NULL::text AS external_id, NULL::text AS text
    FROM saved s
    UNION ALL
    -- the claims in the order they are served: suspects, then fresh items in queue order
    (SELECT false, c.id, c.claim_token, c.run_id, c.prompt_tracking_id, c.target, c.attempts,
            c.deferrals, c.lease_losses, c.max_attempts, c.external_id, c.text
     FROM claimed c JOIN candidates k ON k.id = c.id ORDER BY k.n, k.retry, k.due);
END
$$;

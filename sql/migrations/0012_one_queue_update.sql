-- 0012_one_queue_update: analysisq_complete_and_claim writes the queue in one UPDATE, not
-- two. The answers of a batch (completed, fenced by their claim token) and the items it claims
-- (processing, a new lease and token) are one set of rows of one ModifyTable node: the server
-- sets up a table's update once per execution of each such node (its result relation, the
-- queue's seven indexes, its ten CHECK constraints, which it reads back from their stored
-- text and compiles every time), and the second setup was about a tenth of the database's
-- CPU per batch (docs/benchmarks.md, "the database's CPU per item"). Same guarantees: the
-- same fence (an answer is written only under the writer's token), the same claim order,
-- leases and tokens, one result per item (UNIQUE (queue_id)). No table change, no lock beyond
-- the function's replacement.

CREATE OR REPLACE FUNCTION analysisq_complete_and_claim(
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
    IF p_limit > 0 THEN
        PERFORM 1 FROM rate_pools rp
        WHERE rp.name IN (SELECT t.pool FROM run_targets t
                          WHERE t.run_id = p_run_id AND t.target <> ALL (p_skip_targets))
          AND rp.requests_per_second IS NOT NULL
        ORDER BY rp.name
        FOR NO KEY UPDATE OF rp;
    END IF;
    RETURN QUERY
    WITH input AS (
        SELECT * FROM unnest(p_ids, p_tokens, p_models, p_response_texts, p_parsed,
                             p_tokens_in, p_tokens_out, p_latency_ms)
            AS i(id, token, model, response_text, parsed, tokens_in, tokens_out, latency_ms)
    ), rooms AS (
        -- How many items of each target to serve this claim may hand out, from the state of
        -- its rate pool. Targets in mode batch are claimed by batch_claim only. A pool a
        -- provider's Retry-After blocks: none until the block ends. A pool whose token
        -- schedule (tokensPerMinute) is more than rate_claim_horizon() seconds ahead: none
        -- until it comes nearer (the tokens an item costs are the worker's estimate, so the
        -- claim cannot count them). A pool limited by requestsPerSecond: as many as have a
        -- slot starting within the horizon, after the slots reserved (rate_tat) and promised
        -- (claim_tat). Items that could only wait for their slot stay in the queue rather
        -- than in a worker that holds their leases: an idle claim is exposed to that worker's
        -- death (the stuck reset charges it to the items it held, and the slots they reserved
        -- go unused), and it fills the worker's batchSize slots, which a faster target of the
        -- run then lacks.
        SELECT t.target, t.pool, rp.requests_per_second AS rps, CASE
            WHEN rp.blocked_until > now() THEN 0
            WHEN rp.token_tat > now() + make_interval(secs => rate_claim_horizon()) THEN 0
            WHEN rp.requests_per_second IS NULL THEN p_limit
            ELSE greatest(0, ceil((rate_claim_horizon() - extract(epoch FROM
                                       greatest(rp.rate_tat, rp.claim_tat, now()) - now()))
                                  * rp.requests_per_second))
        END::bigint AS room
        FROM run_targets t JOIN rate_pools rp ON rp.name = t.pool
        WHERE t.run_id = p_run_id AND t.target <> ALL (p_skip_targets)
    ), open AS (
        -- With no target left to claim for the scans below do not run at all (rather than
        -- walk every due item of the targets without room).
        SELECT EXISTS (SELECT 1 FROM rooms WHERE room > 0) AS targets_left
    ), suspects AS (
        -- Items that lost a lease: a worker holding one died or hung. A worker takes at most one
        -- at a time (it passes p_max_suspects = 0 while it holds one), so a prompt that kills its
        -- worker
        -- takes only fresh batch-mates down with it, once, and is poisoned alone. Few items are
        -- suspects: analysis_queue_suspect_idx holds only them.
        SELECT q.id, (q.status = 'failed') AS retry, q.next_attempt_at AS due, q.attempts,
               q.target
        FROM analysis_queue q
        WHERE q.run_id = p_run_id
          AND q.status IN ('pending', 'failed')
          AND q.next_attempt_at IS NOT NULL
          AND q.next_attempt_at <= now()
          AND q.lease_losses > 0
          -- the targets with room (see `rooms`), as an array, not `q.target <> ALL (...)`: the
          -- planner rates that near 0 rows for a run of one or a few targets and, in a generic
          -- plan, trades the index's order for a full scan and a sort
          AND q.target = ANY (ARRAY(SELECT r.target FROM rooms r WHERE r.room > 0))
          AND (SELECT targets_left FROM open)
        ORDER BY (q.status = 'failed'), q.next_attempt_at
        LIMIT least(p_limit, p_max_suspects)
        FOR UPDATE OF q SKIP LOCKED
    ), fresh AS (
        -- pending items first, then failed items whose backoff elapsed; next_attempt_at also
        -- defers pending items released after a 429, and parks the items of a paused target at
        -- 'infinity', so this scan needs no other condition and walks analysis_queue_claim_idx
        -- in order, stopping at the LIMIT.
        SELECT q.id, (q.status = 'failed') AS retry, q.next_attempt_at AS due, q.attempts,
               q.target
        FROM analysis_queue q
        WHERE q.run_id = p_run_id
          AND q.status IN ('pending', 'failed')
          AND q.next_attempt_at IS NOT NULL
          AND q.next_attempt_at <= now()
          AND q.lease_losses = 0
          -- the targets whose room is the whole claim (see `rooms`; the others have `capped`),
          -- as an array, not `q.target <> ALL (...)`: the planner rates that near 0 rows for a
          -- run of one or a few targets and, in a generic plan, trades the index's order for a
          -- full scan and a sort
          AND q.target = ANY (ARRAY(SELECT r.target FROM rooms r WHERE r.room >= p_limit))
          AND (SELECT targets_left FROM open)
        ORDER BY (q.status = 'failed'), q.next_attempt_at
        LIMIT p_limit - (SELECT count(*) FROM suspects)
        -- rows another worker is claiming are skipped, not waited for
        FOR UPDATE OF q SKIP LOCKED
    ), capped AS (
        -- Each target with some room but less than the claim: a scan of its own, up to its
        -- room, in the same order, so that its items ahead in the queue do not take the
        -- claim's other slots from the other targets.
        SELECT f.id, f.retry, f.due, f.attempts, f.target
        FROM rooms r CROSS JOIN LATERAL (
            SELECT q.id, (q.status = 'failed') AS retry, q.next_attempt_at AS due, q.attempts,
                   q.target
            FROM analysis_queue q
            WHERE q.run_id = p_run_id
              AND q.status IN ('pending', 'failed')
              AND q.next_attempt_at IS NOT NULL
              AND q.next_attempt_at <= now()
              AND q.lease_losses = 0
              AND q.target = r.target
            ORDER BY (q.status = 'failed'), q.next_attempt_at
            LIMIT r.room
            FOR UPDATE OF q SKIP LOCKED
        ) f
        WHERE r.room > 0 AND r.room < p_limit AND (SELECT targets_left FROM open)
    ), candidates AS (
        -- the scans' own rows, not joined back to analysis_queue: LIMIT p_limit - count(*) is no
        -- constant, the planner takes it for 10% of the queue and would hash a scan of it all.
        -- `take`: the items claimed, in the order they are served, at most a target's room of
        -- each (a suspect and its target's capped scan may both have found one) and p_limit in
        -- all (the capped scans read beyond `fresh`'s LIMIT); the rows not taken stay
        -- waiting, their row locks gone at commit.
        SELECT c.id, c.n, c.retry, c.due, c.exhausted,
               c.allowed AND row_number() OVER (PARTITION BY c.allowed
                                                ORDER BY c.n, c.retry, c.due) <= p_limit AS take
        FROM (SELECT s.id, s.n, s.retry, s.due, s.exhausted,
                     NOT s.exhausted
                     AND row_number() OVER (PARTITION BY s.target, s.exhausted
                                            ORDER BY s.n, s.retry, s.due)
                         <= (SELECT r.room FROM rooms r WHERE r.target = s.target) AS allowed
              FROM (SELECT u.id, u.n, u.retry, u.due, u.target,
                           u.attempts >= r.max_attempts AS exhausted
                    FROM (SELECT id, 0 AS n, retry, due, attempts, target FROM suspects
                          UNION ALL SELECT id, 1, retry, due, attempts, target FROM fresh
                          UNION ALL SELECT id, 1, retry, due, attempts, target FROM capped) u
                    CROSS JOIN analysis_runs r
                    WHERE r.id = p_run_id) s) c
    ), exhausted AS (
        -- Waiting items with no attempt left end here, failed for good (fail_exhausted,
        -- shared with batch_claim; free when there is none)
        SELECT fail_exhausted(ARRAY(SELECT c.id FROM candidates c WHERE c.exhausted)) AS failed
    ), changed AS (
        -- Both halves' writes of the queue in one UPDATE (migration 0012): the answered items
        -- (`done`: completed, fenced by their claim token) and the items claimed (`done` false:
        -- processing, a new lease and token). One ModifyTable node, not two: the server sets
        -- up a table's update (its result relation, its seven indexes, its ten CHECK
        -- constraints, compiled from their stored text) once per execution of each node, and
        -- that was a tenth of its CPU per batch (docs/benchmarks.md, "the database's CPU per
        -- item"). The two sets are disjoint: `done` rows are processing under the writer's
        -- token, the claims waiting ones.
        UPDATE analysis_queue q SET
            status = CASE WHEN w.done THEN 'completed' ELSE 'processing' END,
            completed_at = CASE WHEN w.done THEN now() END,
            updated_at = now(),
            error_class = CASE WHEN w.done THEN NULL ELSE q.error_class END,
            error_message = CASE WHEN w.done THEN NULL ELSE q.error_message END,
            attempts = q.attempts + CASE WHEN w.done THEN 0 ELSE 1 END,
            lease_owner = CASE WHEN w.done THEN NULL ELSE p_worker END,
            lease_expires_at = CASE WHEN w.done THEN NULL
                                    ELSE now() + make_interval(secs => p_lease_seconds) END,
            -- the fence: every later write for this claim must present this token
            claim_token = CASE WHEN w.done THEN NULL ELSE gen_random_uuid() END,
            -- NULL for both: a processing item has none, nor has a waiting one (CHECKs)
            next_attempt_at = NULL,
            submission_id = NULL
        FROM (SELECT i.id, i.token, true AS done FROM input i
              UNION ALL
              SELECT c.id, NULL::uuid, false FROM candidates c WHERE c.take) w
        -- By key, and for an answer the token is the fence: a claim token exists exactly
        -- while the item is processing (CHECK processing_has_lease), so no status condition
        -- is needed, and none is written: with one the generic plan read every processing
        -- item by the status index when the statistics had seen few (a batch reading what all
        -- workers hold). The claims by an id array, not a join with `candidates` (see there).
        WHERE q.id = ANY (p_ids || ARRAY(SELECT c.id FROM candidates c WHERE c.take))
          AND q.id = w.id AND (NOT w.done OR q.claim_token = w.token)
          -- a condition on no row: evaluated once, before the scan, so `exhausted` runs even
          -- when nothing is left to claim (a SELECT in WITH runs only where it is read)
          AND (SELECT failed FROM exhausted) IS NOT NULL
        RETURNING w.done, q.id, q.claim_token, q.run_id, q.prompt_tracking_id, q.target,
                  q.attempts, q.deferrals, q.lease_losses
    ), healthy AS (
        -- an answer: the target works, so a streak of target faults (the breaker) is broken
        UPDATE run_targets t SET fault = NULL, fault_streak = 0, fault_items = '{}'
        FROM (SELECT DISTINCT run_id, target FROM changed WHERE done) d
        WHERE t.run_id = d.run_id AND t.target = d.target AND t.fault IS NOT NULL
          AND t.paused_at IS NULL
    ), saved AS (
        INSERT INTO analysis_results (queue_id, run_id, prompt_tracking_id, target, model,
                                      response_text, parsed, tokens_in, tokens_out, latency_ms,
                                      attempt, via_batch)
        SELECT d.id, d.run_id, d.prompt_tracking_id, d.target, i.model, i.response_text,
               i.parsed::jsonb, i.tokens_in, i.tokens_out, i.latency_ms, d.attempts, p_via_batch
        FROM changed d JOIN input i ON i.id = d.id
        WHERE d.done
        RETURNING queue_id
    ), promised AS (
        -- the slots of the items claimed for pools limited by requestsPerSecond, promised
        -- after those reserved and promised before (see `rooms`); their attempts reserve them
        UPDATE rate_pools rp SET
            claim_tat = greatest(rp.rate_tat, rp.claim_tat, now())
                        + make_interval(secs => n.items / rp.requests_per_second)
        FROM (SELECT r.pool, count(*) AS items
              FROM changed c JOIN rooms r ON r.target = c.target
              WHERE r.rps IS NOT NULL AND NOT c.done
              GROUP BY r.pool) n
        WHERE rp.name = n.pool
    )
    SELECT true AS written, s.queue_id AS id, NULL::uuid AS claim_token, NULL::text AS run_id,
           NULL::bigint AS prompt_tracking_id, NULL::text AS target, NULL::integer AS attempts,
           NULL::integer AS deferrals, NULL::integer AS lease_losses,
           NULL::integer AS max_attempts, NULL::text AS external_id, NULL::text AS text
    FROM saved s
    UNION ALL
    -- the claims in the order they are served: suspects, then fresh items in queue order
    (SELECT false, c.id, c.claim_token, c.run_id, c.prompt_tracking_id, c.target, c.attempts,
            c.deferrals, c.lease_losses, r.max_attempts, p.external_id, p.text
     FROM changed c JOIN candidates k ON k.id = c.id
          JOIN prompts p ON p.id = c.prompt_tracking_id JOIN analysis_runs r ON r.id = c.run_id
     WHERE NOT c.done ORDER BY k.n, k.retry, k.due);
END
$$;

-- Every query analysisq runs, as named blocks. `-- name: X` starts a block; the loader
-- (analysisq.db.sql) reads them once into a dict, and each has one typed wrapper in
-- analysisq.queue. Values are always bind parameters, never formatted into the text, and
-- always named (`:run_id`, passed by keyword; the loader numbers them once, on load).

-- name: upsert_prompt
-- Import: insert prompts or update them in place by external id. Tags arrive as JSON arrays
-- (one text per row) because unnest would flatten a two-dimensional array.
INSERT INTO prompts (external_id, text, tags, active, metadata)
SELECT i.external_id, i.text, ARRAY(SELECT jsonb_array_elements_text(i.tags::jsonb)),
       i.active, i.metadata::jsonb
FROM unnest(:external_ids::text[], :texts::text[], :tags::text[], :actives::boolean[],
            :metadata::text[])
    AS i(external_id, text, tags, active, metadata)
ON CONFLICT (external_id) DO UPDATE SET
    text = excluded.text, tags = excluded.tags, active = excluded.active,
    metadata = excluded.metadata, updated_at = now()
WHERE (prompts.text, prompts.tags, prompts.active, prompts.metadata)
      IS DISTINCT FROM (excluded.text, excluded.tags, excluded.active, excluded.metadata)
RETURNING (xmax = 0) AS inserted;

-- name: upsert_run
-- Record a run (idempotent: the operator calls it on every resume).
INSERT INTO analysis_runs (id, name, spec, max_attempts, max_lease_losses, lease_seconds)
VALUES (:run_id, :name, :spec::jsonb, :max_attempts, :max_lease_losses, :lease_seconds)
ON CONFLICT (id) DO UPDATE SET
    spec = excluded.spec, max_attempts = excluded.max_attempts,
    max_lease_losses = excluded.max_lease_losses, lease_seconds = excluded.lease_seconds
RETURNING id, filled_at;

-- name: run_max_attempts
SELECT max_attempts FROM analysis_runs WHERE id = :run_id;

-- name: finalize_exhausted
-- After maxAttempts was lowered: retrying items that have no attempt left fail for good, so
-- "failed with a next attempt time" always means "will be retried".
UPDATE analysis_queue q SET next_attempt_at = NULL, updated_at = now()
FROM analysis_runs r
WHERE r.id = :run_id AND q.run_id = r.id AND q.status = 'failed'
  AND q.next_attempt_at IS NOT NULL AND q.attempts >= r.max_attempts;

-- name: upsert_run_target
-- :pool = the target's rate pool (quotas: pool_lock first); :input_per_million-:batch_discount
-- its pricing (may be NULL); :fault_threshold the circuit breaker's threshold
-- (targetFaultThreshold).
INSERT INTO run_targets (run_id, target, requests_per_second, tokens_per_minute, pool,
                         input_per_million, output_per_million, batch_discount, fault_threshold)
VALUES (:run_id, :target, :requests_per_second, :tokens_per_minute, :pool,
        :input_per_million, :output_per_million, :batch_discount, :fault_threshold)
ON CONFLICT (run_id, target) DO UPDATE SET
    requests_per_second = excluded.requests_per_second,
    tokens_per_minute = excluded.tokens_per_minute,
    pool = excluded.pool,
    input_per_million = excluded.input_per_million,
    output_per_million = excluded.output_per_million,
    batch_discount = excluded.batch_discount,
    fault_threshold = excluded.fault_threshold;

-- name: get_run
SELECT id, name, spec::text AS spec, max_attempts, max_lease_losses, lease_seconds,
       filled_at, finished_at, created_at
FROM analysis_runs WHERE id = :run_id;

-- name: find_run
-- A run by id, or the newest run with that name.
SELECT id, name, spec::text AS spec, max_attempts, max_lease_losses, lease_seconds,
       filled_at, finished_at, created_at
FROM analysis_runs WHERE id = :id_or_name OR name = :id_or_name
ORDER BY (id = :id_or_name) DESC, created_at DESC LIMIT 1;

-- name: list_runs
SELECT id, name, created_at, filled_at, finished_at FROM analysis_runs
ORDER BY created_at DESC LIMIT :limit;

-- name: delete_run
-- The run with its targets and queue rows (ON DELETE CASCADE) and its results, which have no
-- foreign key to the queue (retention may remove queue rows and keep results). Refused
-- while a provider batch of the run is open (it would run on, paid, known to nobody):
-- returns how many are open, and deletes only when none is.
WITH open_batches AS (
    SELECT count(*)::integer AS n FROM batch_submissions
    WHERE run_id = :run_id AND state <> 'done'
), results AS (
    DELETE FROM analysis_results WHERE run_id = :run_id AND (SELECT n FROM open_batches) = 0
), deleted AS (
    DELETE FROM analysis_runs WHERE id = :run_id AND (SELECT n FROM open_batches) = 0
)
SELECT n FROM open_batches;

-- name: fill_run
-- The one idempotent fill: every selected prompt x every target of the run; a second run, or
-- a run after a crash half-way, adds exactly what is missing. Returns how many rows it added.
-- Selection: explicit ids (active or not) when given; else every active prompt; tags, when
-- given, keep the prompts having at least one of them. analysisq_fill_run (migration 0013)
-- inserts without ON CONFLICT unless a concurrent fill got there first, and its rows skip the
-- per-row reference check (they come from prompts under the prompts' lock).
SELECT analysisq_fill_run(:run_id, :targets::text[], :tags::text[], :ids::text[]);

-- name: mark_filled
UPDATE analysis_runs SET filled_at = coalesce(filled_at, now()) WHERE id = :run_id;

-- name: mark_finished
UPDATE analysis_runs SET finished_at = coalesce(finished_at, now()) WHERE id = :run_id;

-- name: missing_prompt_ids
-- Explicit ids of a selector that match no stored prompt (reported, not fatal).
SELECT i FROM unnest(:ids::text[]) AS i
WHERE NOT EXISTS (SELECT 1 FROM prompts p WHERE p.external_id = i);

-- name: heartbeat
-- Renew the leases still ours; the ids not returned were lost.
UPDATE analysis_queue q SET
    lease_expires_at = now() + make_interval(secs => :lease_seconds),
    updated_at = now()
FROM unnest(:ids::bigint[], :tokens::uuid[]) AS h(id, token)
WHERE q.id = h.id AND q.claim_token = h.token AND q.status = 'processing'
RETURNING q.id;

-- name: fail
-- Fenced failure. :retry_in = seconds until the retry, NULL = failed for good.
UPDATE analysis_queue SET
    status = 'failed', error_class = :error_class, error_message = :error_message,
    next_attempt_at = CASE WHEN :retry_in::double precision IS NULL THEN NULL
                           ELSE now() + make_interval(secs => :retry_in) END,
    lease_owner = NULL, lease_expires_at = NULL, claim_token = NULL, submission_id = NULL,
    updated_at = now()
WHERE id = :item_id AND claim_token = :token AND status = 'processing'
RETURNING id;

-- name: release
-- Fenced release back to pending that does not count as an attempt: shutdown, a 429 (:deferral
-- = 1 counts a deferral), a paused target (:park = true parks it until the target resumes).
-- :error_class/:error_message record why (may be NULL).
WITH target AS (
    -- Park only while the target is still paused. Read under a share lock: a resume that
    -- committed first is seen (the item is due at once), a resume that comes later waits
    -- for this release and then unparks the item (resume_targets).
    -- Only when parking: other releases (a 429 above all) leave the target's row, which
    -- every rate-limited request updates, unlocked.
    SELECT t.paused_at IS NOT NULL AS paused
    FROM analysis_queue q JOIN run_targets t ON t.run_id = q.run_id AND t.target = q.target
    WHERE q.id = :item_id AND :park::boolean
    FOR SHARE OF t
)
UPDATE analysis_queue SET
    status = 'pending', attempts = greatest(attempts - 1, 0),
    deferrals = deferrals + :deferral,
    error_class = coalesce(:error_class, error_class),
    error_message = coalesce(:error_message, error_message),
    next_attempt_at = CASE WHEN :park::boolean AND (SELECT paused FROM target) THEN 'infinity'
                           ELSE now() + make_interval(secs => :delay) END,
    lease_owner = NULL, lease_expires_at = NULL, claim_token = NULL, submission_id = NULL,
    updated_at = now()
WHERE id = :item_id AND claim_token = :token AND status = 'processing'
RETURNING id;

-- name: rescue_stuck
-- :live_tokens: the claim tokens the caller still works on (never reset).
SELECT reset_count, poisoned_count
FROM cleanup_stuck_queue_items(:run_id, make_interval(secs => :stuck_after_seconds),
                               :live_tokens::uuid[]);

-- name: pause_target
-- Pause a target for the run (its provider refused our credentials) and park its waiting
-- items at next_attempt_at = 'infinity': none is claimed, none burns an attempt.
WITH paused AS (
    UPDATE run_targets SET paused_at = now(), pause_reason = :reason
    WHERE run_id = :run_id AND target = :target AND paused_at IS NULL
    RETURNING target
), parked AS (
    UPDATE analysis_queue SET next_attempt_at = 'infinity'
    WHERE run_id = :run_id AND target = :target AND status IN ('pending', 'failed')
      AND next_attempt_at IS NOT NULL
)
SELECT target FROM paused;

-- name: resume_target
-- Resume paused targets (one, or all of the run's with :target NULL), their circuit breaker
-- starting over. Then unpark_targets, as a second statement of the same transaction: it must
-- see the items that a release parked while this one waited for its lock on the target.
UPDATE run_targets SET paused_at = NULL, pause_reason = NULL,
    fault = NULL, fault_streak = 0, fault_items = '{}'
WHERE run_id = :run_id AND (:target::text IS NULL OR target = :target)
  AND paused_at IS NOT NULL
RETURNING target;

-- name: unpark_targets
-- The parked items of the resumed targets :targets are due now.
UPDATE analysis_queue SET next_attempt_at = now()
WHERE run_id = :run_id AND target = ANY (:targets::text[]) AND next_attempt_at = 'infinity';

-- name: run_targets
-- fault: the circuit breaker's current streak (while paused: the fault that paused it).
SELECT target, requests_per_second, tokens_per_minute, pool, paused_at, pause_reason, fault
FROM run_targets WHERE run_id = :run_id ORDER BY target;

-- name: run_counts
-- Counts for status: failed = failed for good, retrying = failed but will be retried,
-- stuck = processing with an expired lease.
SELECT count(*) AS total,
       count(*) FILTER (WHERE status = 'pending') AS pending,
       count(*) FILTER (WHERE status = 'processing') AS processing,
       count(*) FILTER (WHERE status = 'completed') AS completed,
       count(*) FILTER (WHERE status = 'failed' AND next_attempt_at IS NULL) AS failed,
       count(*) FILTER (WHERE status = 'failed' AND next_attempt_at IS NOT NULL) AS retrying,
       count(*) FILTER (WHERE status = 'processing' AND lease_expires_at < now()) AS stuck
FROM analysis_queue WHERE run_id = :run_id;

-- name: status_breakdown
-- The seed's first monitoring query, optionally for one run.
SELECT status, count(*) AS cantidad,
       round(100.0 * count(*) / nullif(sum(count(*)) OVER (), 0), 2) AS porcentaje
FROM analysis_queue
WHERE :run_id::text IS NULL OR run_id = :run_id
GROUP BY status
ORDER BY CASE status WHEN 'pending' THEN 1 WHEN 'processing' THEN 2
                     WHEN 'completed' THEN 3 WHEN 'failed' THEN 4 END;

-- name: stuck_items
-- The seed's stuck query, with the lease made visible.
SELECT count(*) AS stuck_items, min(updated_at) AS mas_antiguo,
       count(*) FILTER (WHERE lease_expires_at < now()) AS lease_expired
FROM analysis_queue
WHERE status = 'processing'
  AND (:run_id::text IS NULL OR run_id = :run_id)
  AND (updated_at < now() - make_interval(secs => :older_than_seconds)
       OR lease_expires_at < now());

-- name: failed_items
SELECT q.id, q.prompt_tracking_id, p.external_id, q.target, q.attempts, q.error_class,
       q.error_message, q.updated_at, q.next_attempt_at IS NOT NULL AS will_retry
FROM analysis_queue q JOIN prompts p ON p.id = q.prompt_tracking_id
WHERE q.status = 'failed' AND (:run_id::text IS NULL OR q.run_id = :run_id)
ORDER BY q.updated_at DESC
LIMIT :limit;

-- name: error_summary
SELECT error_class, error_message, count(*) AS count
FROM analysis_queue
WHERE status = 'failed' AND (:run_id::text IS NULL OR run_id = :run_id)
GROUP BY error_class, error_message
ORDER BY count(*) DESC, error_message
LIMIT :limit;

-- name: error_classes
-- Errors by class across the run, including the last error of items now retrying or pending.
SELECT error_class, count(*) AS count
FROM analysis_queue
WHERE run_id = :run_id AND error_class IS NOT NULL
GROUP BY error_class ORDER BY count(*) DESC;

-- name: results_page
-- Results of a run by keyset paging; cost from the target's pricing (NULL without), less
-- the batch discount for an answer that came through a provider batch.
SELECT r.id, r.queue_id, p.external_id, r.target, r.model, r.response_text, r.parsed::text,
       r.tokens_in, r.tokens_out, r.latency_ms, r.attempt, r.created_at, r.via_batch,
       token_cost(r.tokens_in, r.tokens_out, t.input_per_million, t.output_per_million,
                  CASE WHEN r.via_batch THEN t.batch_discount END) AS cost
FROM analysis_results r JOIN prompts p ON p.id = r.prompt_tracking_id
JOIN run_targets t ON t.run_id = r.run_id AND t.target = r.target
WHERE r.run_id = :run_id AND r.id > :after_id
ORDER BY r.id LIMIT :limit;

-- name: throughput
-- Items completed in the last :window_seconds seconds (for items/s and ETA).
SELECT count(*) AS n FROM analysis_queue
WHERE run_id = :run_id AND status = 'completed'
  AND completed_at > now() - make_interval(secs => :window_seconds);

-- ---------------------------------------------------------------------------------------
-- Local runs and the runbook commands (analysisq.queue.monitor)
-- ---------------------------------------------------------------------------------------

-- name: target_backlog
-- Open items per target: processing, and waiting (pending or failed-but-retrying). A local
-- run whose every waiting item belongs to a paused target stops instead of idling.
SELECT target,
       count(*) FILTER (WHERE status = 'processing') AS processing,
       count(*) FILTER (WHERE status = 'pending'
                           OR (status = 'failed' AND next_attempt_at IS NOT NULL)) AS waiting
FROM analysis_queue
WHERE run_id = :run_id AND (status IN ('pending', 'processing')
                       OR (status = 'failed' AND next_attempt_at IS NOT NULL))
GROUP BY target ORDER BY target;

-- name: completed_by_attempt
-- How many attempts the completed items of a run needed.
SELECT attempts AS attempt, count(*) AS count
FROM analysis_queue
WHERE run_id = :run_id AND status = 'completed'
GROUP BY attempts ORDER BY attempts;

-- name: retry_totals
-- 429 deferrals (not attempts) and items that lost a lease (a worker died holding them).
SELECT coalesce(sum(deferrals), 0)::bigint AS deferrals,
       count(*) FILTER (WHERE deferrals > 0) AS deferred_items,
       count(*) FILTER (WHERE lease_losses > 0) AS lease_lost_items
FROM analysis_queue WHERE run_id = :run_id;

-- ---------------------------------------------------------------------------------------
-- Quotas, cost and budgets: rate pools, token reservations, budgets, totals
-- (analysisq.queue.ratelimit, analysisq.queue.budget, analysisq.queue.usage)
-- ---------------------------------------------------------------------------------------

-- name: pool_lock
-- Create the rate pool :pool with limits (:requests_per_second, :tokens_per_minute), or lock
-- the existing row; returns its limits as they are (a concurrent run creation waits here).
INSERT INTO rate_pools AS rp (name, requests_per_second, tokens_per_minute)
VALUES (:pool, :requests_per_second, :tokens_per_minute)
ON CONFLICT (name) DO UPDATE SET name = rp.name
RETURNING requests_per_second, tokens_per_minute;

-- name: pool_users
-- Targets of other unfinished runs than :run_id that use pool :pool: they hold its limits.
SELECT t.run_id, t.target
FROM run_targets t JOIN analysis_runs r ON r.id = t.run_id
WHERE t.pool = :pool AND t.run_id <> :run_id AND r.finished_at IS NULL
ORDER BY t.run_id, t.target LIMIT 5;

-- name: pool_set_limits
UPDATE rate_pools
SET requests_per_second = :requests_per_second, tokens_per_minute = :tokens_per_minute
WHERE name = :pool;

-- name: pool_forget_unused
-- Pools no target refers to any more (their runs were deleted).
DELETE FROM rate_pools p WHERE NOT EXISTS (SELECT 1 FROM run_targets t WHERE t.pool = p.name);

-- name: pool_acquire
-- Reserve the next request slot of pool :pool across every worker of every run (GCRA without
-- burst): the theoretical arrival time moves by 1/rate per request and by :tokens * 60 / tpm
-- for the request's estimated tokens, never from before blocked_until. Returns how long this
-- caller waits before sending: until its own slot starts, so no window of any length sees more
-- than its share plus one request.
UPDATE rate_pools SET
    rate_tat = CASE WHEN requests_per_second IS NULL THEN rate_tat
        ELSE greatest(rate_tat, clock_timestamp(), blocked_until)
             + make_interval(secs => 1.0 / requests_per_second) END,
    token_tat = CASE WHEN tokens_per_minute IS NULL THEN token_tat
        ELSE greatest(token_tat, clock_timestamp(), blocked_until)
             + make_interval(secs => :tokens * 60.0 / tokens_per_minute) END
WHERE name = :pool
RETURNING greatest(0.0,
    extract(epoch FROM blocked_until - clock_timestamp()),
    CASE WHEN requests_per_second IS NULL THEN 0.0 ELSE extract(epoch FROM
        rate_tat - make_interval(secs => 1.0 / requests_per_second) - clock_timestamp()) END,
    CASE WHEN tokens_per_minute IS NULL THEN 0.0 ELSE extract(epoch FROM
        token_tat - make_interval(secs => :tokens * 60.0 / tokens_per_minute)
        - clock_timestamp()) END)::double precision
    AS wait_seconds,
    token_debt;

-- name: pool_block
-- A provider said wait (429 Retry-After, or rate-limit headers at zero): nobody sends to the
-- pool of run :run_id's target :target, from any run, for :seconds seconds.
UPDATE rate_pools
SET blocked_until = greatest(blocked_until,
                             clock_timestamp() + make_interval(secs => :seconds))
WHERE name = (SELECT pool FROM run_targets WHERE run_id = :run_id AND target = :target);

-- name: pool_settle_tokens
-- The answer's usage replaces the estimate: move token_tat by the difference (:delta tokens,
-- negative when the request cost less than reserved); an excess also adds to token_debt.
UPDATE rate_pools SET
    token_tat = token_tat + make_interval(secs => :delta * 60.0 / tokens_per_minute),
    token_debt = token_debt + greatest(:delta, 0.0) * 60.0 / tokens_per_minute
WHERE name = :pool AND tokens_per_minute IS NOT NULL AND token_tat > '-infinity';

-- name: pool_token_debt
SELECT token_debt FROM rate_pools WHERE name = :pool;

-- name: budget_set
-- The run's budget (NULL = none); a changed budget lifts a BudgetExhausted pause.
UPDATE analysis_runs SET
    budget_exhausted_at = CASE WHEN (max_cost, max_tokens)
                                    IS DISTINCT FROM (:max_cost, :max_tokens)
                               THEN NULL ELSE budget_exhausted_at END,
    max_cost = :max_cost, max_tokens = :max_tokens
WHERE id = :run_id;

-- name: budget_reserve
-- Reserve :tokens_in input + :tokens_out output tokens (and their cost at target :target's
-- prices, less its batch discount when :via_batch: sent through a provider batch) for one
-- request of run :run_id, only if what is spent, what is in flight and this request fit the
-- budget and the run is not paused for its budget. No row: it does not fit.
UPDATE analysis_runs r SET
    reserved_tokens = r.reserved_tokens + :tokens_in + :tokens_out,
    reserved_cost = r.reserved_cost + coalesce(token_cost(:tokens_in, :tokens_out,
        t.input_per_million, t.output_per_million,
        CASE WHEN :via_batch THEN t.batch_discount END), 0)
FROM run_targets t
WHERE r.id = :run_id AND t.run_id = r.id AND t.target = :target
  AND r.budget_exhausted_at IS NULL
  AND (r.max_tokens IS NULL
       OR r.spent_tokens + r.reserved_tokens + :tokens_in + :tokens_out <= r.max_tokens)
  AND (r.max_cost IS NULL OR r.spent_cost + r.reserved_cost
       + coalesce(token_cost(:tokens_in, :tokens_out,
                             t.input_per_million, t.output_per_million,
                             CASE WHEN :via_batch THEN t.batch_discount END), 0)
       <= r.max_cost)
RETURNING r.id;

-- name: budget_exhaust
-- A request did not fit: the run is paused for its budget (workers stop claiming).
UPDATE analysis_runs SET budget_exhausted_at = coalesce(budget_exhausted_at, now())
WHERE id = :run_id;

-- name: budget_settle
-- A request of run :run_id to target :target ended: its reservation (:reserved_in in +
-- :reserved_out out tokens) is released and what the provider charged (:spent_in in +
-- :spent_out out tokens) is spent, both less the target's batch discount when :via_batch (sent
-- through a provider batch).
UPDATE analysis_runs r SET
    reserved_tokens = greatest(r.reserved_tokens - :reserved_in - :reserved_out, 0),
    reserved_cost = greatest(r.reserved_cost - coalesce(token_cost(:reserved_in, :reserved_out,
        t.input_per_million, t.output_per_million,
        CASE WHEN :via_batch THEN t.batch_discount END), 0), 0),
    spent_tokens = r.spent_tokens + :spent_in + :spent_out,
    spent_cost = r.spent_cost + coalesce(token_cost(:spent_in, :spent_out, t.input_per_million,
        t.output_per_million, CASE WHEN :via_batch THEN t.batch_discount END), 0)
FROM run_targets t
WHERE r.id = :run_id AND t.run_id = r.id AND t.target = :target;

-- name: budget_state
SELECT max_cost, max_tokens, spent_cost, spent_tokens, reserved_cost, reserved_tokens,
       budget_exhausted_at
FROM analysis_runs WHERE id = :run_id;

-- name: usage_by_target
-- Tokens and cost of the stored answers of run :run_id, per target (cost NULL without
-- pricing): answers through a provider batch at the target's batch discount, the others in
-- full.
SELECT t.target, t.pool, count(r.id) AS answers,
       coalesce(sum(r.tokens_in), 0)::bigint AS tokens_in,
       coalesce(sum(r.tokens_out), 0)::bigint AS tokens_out,
       token_cost(coalesce(sum(r.tokens_in) FILTER (WHERE NOT r.via_batch), 0)::bigint,
                  coalesce(sum(r.tokens_out) FILTER (WHERE NOT r.via_batch), 0)::bigint,
                  t.input_per_million, t.output_per_million)
       + token_cost(coalesce(sum(r.tokens_in) FILTER (WHERE r.via_batch), 0)::bigint,
                    coalesce(sum(r.tokens_out) FILTER (WHERE r.via_batch), 0)::bigint,
                    t.input_per_million, t.output_per_million, t.batch_discount) AS cost
FROM run_targets t
LEFT JOIN analysis_results r ON r.run_id = t.run_id AND r.target = t.target
WHERE t.run_id = :run_id
GROUP BY t.target, t.pool, t.input_per_million, t.output_per_million, t.batch_discount
ORDER BY t.target;

-- ---------------------------------------------------------------------------------------
-- Target faults and bulk retry (analysisq.queue.retries, analysisq.queue.breaker)
-- ---------------------------------------------------------------------------------------

-- name: target_has_results
-- Whether target :target of run :run_id has any result: then its model may no longer change.
SELECT EXISTS (SELECT 1 FROM analysis_results WHERE run_id = :run_id AND target = :target);

-- name: lock_retry_targets
-- Bulk retry takes the circuit breaker's lock order: the run's target rows (only target
-- :target's when given) before any queue row, so a retry racing a tripping breaker waits, not
-- deadlocks.
SELECT target FROM run_targets
WHERE run_id = :run_id AND (:target::text IS NULL OR target = :target::text)
ORDER BY target
FOR UPDATE;

-- name: retry_failed
-- Bulk retry: put the run's failed-for-good items back in the queue, optionally only those of
-- error class :error_class, target :target, or whose message contains :error
-- (case-insensitive). Attempts, deferrals and lease losses start again; the error that failed
-- the item moves to last_error. Items of a paused target are parked until it is resumed, like
-- every waiting item of it. A finished run that gets items back is no longer finished, and the
-- circuit breaker of each target touched starts over (someone fixed something).
WITH chosen AS (
    SELECT q.id, t.paused_at IS NOT NULL AS paused
    FROM analysis_queue q
    JOIN run_targets t ON t.run_id = q.run_id AND t.target = q.target
    WHERE q.run_id = :run_id AND q.status = 'failed' AND q.next_attempt_at IS NULL
      AND (:error_class::text IS NULL OR q.error_class = :error_class::text)
      AND (:target::text IS NULL OR q.target = :target::text)
      AND (:error::text IS NULL OR strpos(lower(q.error_message), lower(:error::text)) > 0)
    FOR UPDATE OF q
), retried AS (
    UPDATE analysis_queue q SET
        status = 'pending', attempts = 0, deferrals = 0, lease_losses = 0, lone_losses = 0,
        last_error = q.error_class || ': ' || q.error_message,
        retries = q.retries + 1,
        error_class = NULL, error_message = NULL,
        next_attempt_at = CASE WHEN c.paused THEN 'infinity'::timestamptz ELSE now() END,
        updated_at = now()
    FROM chosen c
    WHERE q.id = c.id
    RETURNING q.target
), breaker AS (
    UPDATE run_targets SET fault = NULL, fault_streak = 0, fault_items = '{}'
    WHERE run_id = :run_id AND target IN (SELECT target FROM retried) AND fault IS NOT NULL
), reopened AS (
    UPDATE analysis_runs SET finished_at = NULL
    WHERE id = :run_id AND finished_at IS NOT NULL AND EXISTS (SELECT 1 FROM retried)
)
SELECT count(*)::integer FROM retried;

-- name: lock_item_target
-- The circuit breaker serialises a target's faults: lock the target row of item :item_id
-- first.
SELECT t.run_id, t.paused_at IS NOT NULL AS paused
FROM analysis_queue q JOIN run_targets t ON t.run_id = q.run_id AND t.target = q.target
WHERE q.id = :item_id
FOR UPDATE OF t;

-- name: note_target_fault
-- Item :item_id of target :target failed for good with target fault :fault: the streak grows
-- when it is the same fault, else starts again. Returns the streak and the threshold that
-- pauses the target.
UPDATE run_targets SET
    fault_streak = CASE WHEN fault = :fault THEN fault_streak + 1 ELSE 1 END,
    fault_items = CASE WHEN fault = :fault THEN fault_items ELSE '{}' END || :item_id::bigint,
    fault = :fault
WHERE run_id = :run_id AND target = :target
RETURNING fault_streak, fault_threshold;

-- name: give_back_fault_items
-- The breaker tripped (the target is paused now): the items its streak failed for good go
-- back unspent, parked until the target is resumed; their error says why they waited.
UPDATE analysis_queue q SET
    status = 'pending', attempts = greatest(q.attempts - 1, 0),
    next_attempt_at = 'infinity', updated_at = now()
FROM run_targets t
WHERE t.run_id = :run_id AND t.target = :target AND q.id = ANY (t.fault_items)
  AND q.run_id = :run_id AND q.status = 'failed' AND q.next_attempt_at IS NULL
  AND q.error_class = 'permanent';

-- Throughput, history and retention (issue 15: analysisq.queue.items, analysisq.queue.prune)
-- ---------------------------------------------------------------------------------------

-- name: complete_and_claim
-- The worker's one statement per batch: write a finished batch (:ids-:latency_ms one array
-- each: ids, claim tokens, models, texts, parsed JSON, tokens in, tokens out, latencies;
-- :via_batch answered through a provider batch) and claim up to :limit items of run :run_id
-- for worker :worker with a lease of :lease_seconds seconds, at most :max_suspects (NULL =
-- any) of them suspects, skipping the targets :skip_targets. The statement is the function
-- analysisq_complete_and_claim (sql/migrations/0009), whose plan the server keeps, also
-- behind a pooler in transaction mode; its comments say the rest.
SELECT written, id, claim_token, run_id, prompt_tracking_id, target, attempts, deferrals,
       lease_losses, max_attempts, external_id, text
FROM analysisq_complete_and_claim(
    :ids::bigint[], :tokens::uuid[], :models::text[], :response_texts::text[],
    :parsed::text[], :tokens_in::integer[], :tokens_out::integer[],
    :latency_ms::double precision[], :via_batch::boolean, :run_id::text, :limit::bigint,
    :worker::text, :lease_seconds::double precision, :max_suspects::bigint,
    :skip_targets::text[]);

-- name: prunable_runs
-- Runs finished more than :older_than_seconds seconds ago whose queue rows are still there
-- (or, with :results = true, whose results are too), oldest first.
SELECT r.id, r.finished_at
FROM analysis_runs r
WHERE r.finished_at < now() - make_interval(secs => :older_than_seconds)
  AND (r.pruned_at IS NULL
       OR (:results::boolean
           AND EXISTS (SELECT 1 FROM analysis_results x WHERE x.run_id = r.id)))
ORDER BY r.finished_at, r.id;

-- name: prune_queue_batch
-- Delete up to :batch terminal queue rows of finished run :run_id in one short transaction.
-- Only completed and failed-for-good rows (a run retried after it finished keeps its open
-- items), and SKIP LOCKED: a row some transaction holds is left for the next pass, so a prune
-- never waits on (or blocks) a claim, a heartbeat or a completion.
WITH doomed AS (
    SELECT q.id FROM analysis_queue q
    WHERE q.run_id = :run_id
      AND (q.status = 'completed' OR (q.status = 'failed' AND q.next_attempt_at IS NULL))
    LIMIT :batch
    FOR UPDATE SKIP LOCKED
)
DELETE FROM analysis_queue q USING doomed d WHERE q.id = d.id;

-- name: prune_results_batch
-- Delete up to :batch results of run :run_id (after an export when one was asked for).
WITH doomed AS (
    SELECT x.id FROM analysis_results x WHERE x.run_id = :run_id ORDER BY x.id LIMIT :batch
    FOR UPDATE SKIP LOCKED
)
DELETE FROM analysis_results x USING doomed d WHERE x.id = d.id;

-- name: mark_pruned
-- Record the prune once no queue row of the run is left; returns the run id if so.
UPDATE analysis_runs SET pruned_at = coalesce(pruned_at, now())
WHERE id = :run_id AND NOT EXISTS (SELECT 1 FROM analysis_queue q WHERE q.run_id = :run_id)
RETURNING id;
-- Provider Batch APIs: submissions and their items (analysisq.queue.batches)
-- ---------------------------------------------------------------------------------------

-- name: batch_claim
-- Claim up to :limit items of target :target of run :run_id into a new submission, owned by
-- worker :worker for :lease_seconds seconds: the intent and its items commit together, before
-- anything is sent. Items get a claim (the fence of their results) and a lease of
-- :item_lease_seconds seconds that the owner renews with batch_touch_items while they wait
-- inside the provider batch. maxAttempts is read from the database, as in
-- `complete_and_claim`.
WITH scanned AS (
    -- the sync claim's order and conditions, for one target
    SELECT q.id, q.attempts >= r.max_attempts AS exhausted
    FROM analysis_queue q JOIN analysis_runs r ON r.id = q.run_id
    WHERE q.run_id = :run_id
      AND q.status IN ('pending', 'failed')
      AND q.next_attempt_at IS NOT NULL
      AND q.next_attempt_at <= now()
      AND q.target = :target
    ORDER BY (q.status = 'failed'), q.next_attempt_at
    LIMIT :limit
    FOR UPDATE OF q SKIP LOCKED
), exhausted AS (
    -- waiting items with no attempt left end here (fail_exhausted, as in
    -- `complete_and_claim`); read by `submission`, so it runs before it
    SELECT fail_exhausted(ARRAY(SELECT id FROM scanned WHERE exhausted)) AS failed
), candidates AS (
    SELECT id FROM scanned WHERE NOT exhausted
), submission AS (
    -- HAVING: no row (and no submission) when nothing is claimable
    INSERT INTO batch_submissions (run_id, target, item_count, lease_owner, lease_expires_at)
    SELECT :run_id, :target, count(*), :worker, now() + make_interval(secs => :lease_seconds)
    FROM candidates HAVING (SELECT failed FROM exhausted) IS NOT NULL AND count(*) > 0
    RETURNING id
)
UPDATE analysis_queue q SET
    status = 'processing',
    attempts = q.attempts + 1,
    lease_owner = :worker,
    lease_expires_at = now() + make_interval(secs => :item_lease_seconds),
    claim_token = gen_random_uuid(),
    next_attempt_at = NULL,
    submission_id = s.id,
    updated_at = now()
FROM candidates c, submission s, prompts p, analysis_runs r
WHERE q.id = c.id AND p.id = q.prompt_tracking_id AND r.id = q.run_id
RETURNING s.id AS submission_id, q.id, q.claim_token, q.run_id, q.prompt_tracking_id,
          q.target, q.attempts, q.deferrals, q.lease_losses, r.max_attempts, p.external_id,
          -- not the prompts: the sender reads them in pages (batch_prompt_page)
          ''::text AS text;

-- name: batch_take
-- Submissions of run :run_id that worker :worker should work on now, leased to it for
-- :lease_seconds seconds: its own that are due for a poll, and anyone's whose lease expired
-- (the owner died: adoption).
WITH due AS (
    SELECT id FROM batch_submissions
    WHERE run_id = :run_id AND state <> 'done'
      AND ((lease_owner = :worker AND poll_at <= now()) OR lease_expires_at < now())
    ORDER BY id
    LIMIT :limit
    FOR UPDATE SKIP LOCKED
)
UPDATE batch_submissions b SET
    lease_owner = :worker, lease_expires_at = now() + make_interval(secs => :lease_seconds),
    updated_at = now()
FROM due
WHERE b.id = due.id
RETURNING b.id, b.target, b.state, b.provider_batch_id, b.item_count, b.cancel_reason,
          b.created_at;

-- name: batch_heartbeat
-- Renew worker :worker's leases on submissions :ids; the ids not returned were lost.
UPDATE batch_submissions SET lease_expires_at = now() + make_interval(secs => :lease_seconds),
                             updated_at = now()
WHERE id = ANY (:ids::bigint[]) AND lease_owner = :worker AND state <> 'done'
RETURNING id;

-- name: batch_touch_items
-- The items of submission :submission_id are still waiting in its provider batch, watched by
-- its owner :worker: their updated_at stays recent (so the seed's "stuck" query, processing
-- and not updated for 10 minutes, stays true) and their lease runs :lease_seconds seconds
-- more.
UPDATE analysis_queue q SET
    lease_expires_at = now() + make_interval(secs => :lease_seconds), updated_at = now()
FROM batch_submissions b
WHERE b.id = :submission_id AND b.lease_owner = :worker AND b.state <> 'done'
  AND q.submission_id = b.id AND q.status = 'processing';

-- name: batch_submitted
-- The provider accepted submission :submission_id as batch :provider_batch_id (fenced: only
-- while :worker owns it); the first poll after :poll_in seconds.
UPDATE batch_submissions SET
    state = 'submitted', provider_batch_id = :provider_batch_id, submitted_at = now(),
    poll_at = CASE WHEN cancel_reason IS NULL THEN now() + make_interval(secs => :poll_in)
                   ELSE now() END,
    updated_at = now()
WHERE id = :submission_id AND lease_owner = :worker AND state = 'intent'
RETURNING id;

-- name: batch_polled
-- What the last poll of submission :submission_id said; next poll after :poll_in seconds
-- (fenced by owner :worker).
UPDATE batch_submissions SET
    provider_status = :provider_status, request_counts = :request_counts::jsonb,
    -- a cancel asked for while this poll was under way stays due at once
    poll_at = CASE WHEN cancel_reason IS NULL THEN now() + make_interval(secs => :poll_in)
                   ELSE now() END,
    updated_at = now()
WHERE id = :submission_id AND lease_owner = :worker AND state <> 'done'
RETURNING id;

-- name: batch_items
-- The claims of submission :submission_id's items still waiting: what its results are matched
-- against.
SELECT q.id, q.claim_token, q.run_id, q.prompt_tracking_id, q.target, q.attempts,
       q.deferrals, q.lease_losses, r.max_attempts, p.external_id, ''::text AS text
FROM analysis_queue q JOIN prompts p ON p.id = q.prompt_tracking_id
JOIN analysis_runs r ON r.id = q.run_id
WHERE q.submission_id = :submission_id AND q.status = 'processing'
ORDER BY q.id;

-- name: batch_finish
-- Submission :submission_id is done (fenced by owner :worker), with outcome :outcome: every
-- item still waiting in it goes back to pending unspent (not an attempt) after :release_in
-- seconds, with reason :reason if set. Returns the tokens it had reserved from the run's
-- budget (to release them).
WITH finished AS (
    UPDATE batch_submissions SET
        state = 'done', outcome = :outcome, finished_at = now(), updated_at = now(),
        lease_owner = NULL, lease_expires_at = NULL
    WHERE id = :submission_id AND lease_owner = :worker AND state <> 'done'
    RETURNING id, reserved_tokens_in, reserved_tokens_out
), released AS (
    UPDATE analysis_queue q SET
        status = 'pending', attempts = greatest(q.attempts - 1, 0),
        error_class = CASE WHEN :reason::text IS NULL THEN q.error_class ELSE 'transient' END,
        error_message = coalesce(:reason, q.error_message),
        next_attempt_at = now() + make_interval(secs => :release_in),
        lease_owner = NULL, lease_expires_at = NULL, claim_token = NULL, submission_id = NULL,
        updated_at = now()
    FROM finished f
    WHERE q.submission_id = f.id AND q.status = 'processing'
    RETURNING q.id
)
SELECT (SELECT count(*) FROM finished)::integer AS finished,
       (SELECT count(*) FROM released)::integer AS released,
       (SELECT reserved_tokens_in FROM finished) AS reserved_tokens_in,
       (SELECT reserved_tokens_out FROM finished) AS reserved_tokens_out;

-- name: batch_cancel_open
-- Ask for the open submissions of run :run_id (of target :target, or all with NULL) to be
-- cancelled, for reason :reason (suspend, delete, deadline); their owners cancel at the
-- provider and ingest what was answered. Returns how many were asked.
WITH asked AS (
    UPDATE batch_submissions SET cancel_reason = :reason, poll_at = now(), updated_at = now()
    WHERE run_id = :run_id AND (:target::text IS NULL OR target = :target) AND state <> 'done'
      AND cancel_reason IS NULL
    RETURNING id
)
SELECT count(*)::integer FROM asked;

-- name: batch_release_leases
-- A stopping worker :worker hands its open submissions :ids over: their leases end now, so
-- another worker (or the operator cancelling a deleted run's batches) takes them at once.
UPDATE batch_submissions SET lease_expires_at = now(), updated_at = now()
WHERE id = ANY (:ids::bigint[]) AND lease_owner = :worker AND state <> 'done';

-- name: batch_reservation
-- Whether submission :submission_id (an intent of owner :worker) still needs its budget
-- reservation, its row locked until the reservation commits: false once it has one (a crash
-- after it: an adopter sending the batch must not reserve again) or when it is no longer ours.
SELECT reserved_tokens_in IS NULL AS needed FROM batch_submissions
WHERE id = :submission_id AND lease_owner = :worker AND state = 'intent'
FOR UPDATE;

-- name: batch_reserved
-- Submission :submission_id (owner :worker) reserved :tokens_in input + :tokens_out output
-- tokens of the run's budget.
UPDATE batch_submissions SET
    reserved_tokens_in = :tokens_in, reserved_tokens_out = :tokens_out, updated_at = now()
WHERE id = :submission_id AND lease_owner = :worker AND state = 'intent';

-- name: batch_known_ids
-- Provider batches the submissions of target :target of run :run_id already own (Anthropic's
-- reconciliation leaves these out).
SELECT provider_batch_id FROM batch_submissions
WHERE run_id = :run_id AND target = :target AND provider_batch_id IS NOT NULL;

-- name: batch_open
-- The open submissions of run :run_id, for status and the live output.
SELECT id, target, state, provider_batch_id, provider_status, item_count,
       request_counts::text AS request_counts, created_at, submitted_at, cancel_reason,
       lease_owner
FROM batch_submissions
WHERE run_id = :run_id AND state <> 'done'
ORDER BY id;

-- name: batch_summary
-- Items of run :run_id waiting in provider batches, open batches, and results answered through
-- a batch out of all results.
SELECT
    (SELECT count(*) FROM analysis_queue
     WHERE run_id = :run_id AND submission_id IS NOT NULL)::integer AS in_batches,
    (SELECT count(*) FROM batch_submissions
     WHERE run_id = :run_id AND state <> 'done')::integer AS open_batches,
    (SELECT count(*) FROM analysis_results WHERE run_id = :run_id AND via_batch)::integer
        AS answered_by_batch,
    (SELECT count(*) FROM analysis_results WHERE run_id = :run_id)::integer AS answered;
-- ---------------------------------------------------------------------------------------
-- Dashboard and provider metrics (analysisq.queue.dashboard). One query per panel; each
-- reads one run's rows through an index whose first column is run_id (docs/dashboard.md
-- states the cost). Costs come from token_cost at the targets' pricing, NULL without one.
-- ---------------------------------------------------------------------------------------

-- name: dashboard_runs
-- Runs newest first with their counts, items completed in the last :window_seconds seconds and
-- paused targets: one index range of analysis_queue (run_id, ...) per listed run, skipped for
-- the finished runs whose counts the caller already holds (:known_ids ids with their
-- :known_finished_at finished_at: a finished run's counts no longer change; a retry clears
-- finished_at). Those rows come back with counted = false and zero counts.
SELECT r.id, r.name, r.created_at, r.filled_at, r.finished_at,
       coalesce((r.spec ->> 'suspend')::boolean, false) AS suspended,
       coalesce((r.spec ->> 'maxFailedRatio')::double precision, 0.01) AS max_failed_ratio,
       NOT k.known AS counted,
       c.total, c.pending, c.processing, c.completed, c.failed, c.retrying, c.stuck, c.recent,
       (SELECT count(*) FROM run_targets t
        WHERE t.run_id = r.id AND t.paused_at IS NOT NULL) AS paused_targets,
       -- what the stored answers cost at the targets' pricing (NULL when none has any);
       -- the results are read only for priced targets of runs not already held
       -- (answers through a provider batch at the target's batch discount)
       (SELECT sum(token_cost(u.tokens_in, u.tokens_out,
                              t.input_per_million, t.output_per_million)
                   + token_cost(u.batch_in, u.batch_out, t.input_per_million,
                                t.output_per_million, t.batch_discount))
        FROM run_targets t
        CROSS JOIN LATERAL (
            SELECT coalesce(sum(x.tokens_in) FILTER (WHERE NOT x.via_batch), 0)::bigint
                       AS tokens_in,
                   coalesce(sum(x.tokens_out) FILTER (WHERE NOT x.via_batch), 0)::bigint
                       AS tokens_out,
                   coalesce(sum(x.tokens_in) FILTER (WHERE x.via_batch), 0)::bigint AS batch_in,
                   coalesce(sum(x.tokens_out) FILTER (WHERE x.via_batch), 0)::bigint AS batch_out
            FROM analysis_results x WHERE x.run_id = t.run_id AND x.target = t.target
        ) u
        WHERE t.run_id = r.id AND NOT k.known
          AND (t.input_per_million IS NOT NULL OR t.output_per_million IS NOT NULL)) AS cost
FROM analysis_runs r
CROSS JOIN LATERAL (
    SELECT EXISTS (
        SELECT 1 FROM unnest(:known_ids::text[], :known_finished_at::timestamptz[])
            AS h(id, finished_at)
        WHERE h.id = r.id AND h.finished_at = r.finished_at
    ) AS known
) k
CROSS JOIN LATERAL (
    SELECT count(*) AS total,
           count(*) FILTER (WHERE status = 'pending') AS pending,
           count(*) FILTER (WHERE status = 'processing') AS processing,
           count(*) FILTER (WHERE status = 'completed') AS completed,
           count(*) FILTER (WHERE status = 'failed' AND next_attempt_at IS NULL) AS failed,
           count(*) FILTER (WHERE status = 'failed' AND next_attempt_at IS NOT NULL) AS retrying,
           count(*) FILTER (WHERE status = 'processing' AND lease_expires_at < now()) AS stuck,
           count(*) FILTER (WHERE status = 'completed'
                              AND completed_at > now() - make_interval(secs => :window_seconds))
               AS recent
    -- NOT k.known depends on the outer row only: a one-time filter, so no item is read
    FROM analysis_queue q WHERE q.run_id = r.id AND NOT k.known
) c
WHERE :run_id::text IS NULL OR r.id = :run_id
ORDER BY r.created_at DESC, r.id
LIMIT :limit;

-- name: dashboard_run_exists
-- A panel of an unknown run answers 404 (a primary-key lookup).
SELECT EXISTS (SELECT 1 FROM analysis_runs WHERE id = :run_id);

-- name: dashboard_timeline
-- Completed and failed-for-good items over the run's life in :buckets equal buckets
-- (cumulative), and those still open, from completed_at / updated_at: one pass over the run's
-- items.
WITH span AS (
    SELECT extract(epoch FROM created_at) AS t0,
           greatest(extract(epoch FROM coalesce(finished_at, now())),
                    extract(epoch FROM created_at) + 1) AS t1
    FROM analysis_runs WHERE id = :run_id
), items AS (
    SELECT status = 'completed' AS ok,
           status = 'failed' AND next_attempt_at IS NULL AS gave_up,
           extract(epoch FROM CASE WHEN status = 'completed' THEN completed_at
                                   ELSE updated_at END) AS at
    FROM analysis_queue WHERE run_id = :run_id
), hist AS (
    -- events in [edge b-1, edge b) land in bucket b; clamped so late writes stay visible
    SELECT least(greatest(width_bucket(i.at, s.t0, s.t1, :buckets), 1), :buckets) AS b,
           count(*) FILTER (WHERE i.ok) AS completed,
           count(*) FILTER (WHERE i.gave_up) AS failed
    FROM items i, span s WHERE i.ok OR i.gave_up GROUP BY 1
), total AS (
    SELECT count(*) AS n FROM items
), series AS (
    SELECT g, to_timestamp(s.t0 + (s.t1 - s.t0) * g / :buckets) AS at,
           sum(coalesce(h.completed, 0)) OVER w AS completed,
           sum(coalesce(h.failed, 0)) OVER w AS failed
    FROM span s CROSS JOIN generate_series(0, :buckets) g LEFT JOIN hist h ON h.b = g
    WINDOW w AS (ORDER BY g)
)
SELECT series.at, series.completed::bigint AS completed, series.failed::bigint AS failed,
       (total.n - series.completed - series.failed)::bigint AS open
FROM series, total ORDER BY series.g;

-- name: dashboard_targets
-- Per target of a run: counts, items completed in the last :window_seconds seconds, latency
-- percentiles and tokens (and their cost) from the results, the pause. Two grouped passes
-- (queue, results) by run_id.
SELECT t.target, t.requests_per_second, t.tokens_per_minute, t.paused_at, t.pause_reason,
       coalesce(q.total, 0) AS total, coalesce(q.pending, 0) AS pending,
       coalesce(q.processing, 0) AS processing, coalesce(q.completed, 0) AS completed,
       coalesce(q.failed, 0) AS failed, coalesce(q.retrying, 0) AS retrying,
       coalesce(q.recent, 0) AS recent, coalesce(q.deferrals, 0) AS deferrals,
       r.latency_p50_ms, r.latency_p95_ms, r.latency_p99_ms,
       coalesce(r.tokens_in, 0) AS tokens_in, coalesce(r.tokens_out, 0) AS tokens_out,
       -- answers through a provider batch at the target's batch discount
       token_cost(coalesce(r.tokens_in, 0) - coalesce(r.batch_in, 0),
                  coalesce(r.tokens_out, 0) - coalesce(r.batch_out, 0),
                  t.input_per_million, t.output_per_million)
       + token_cost(coalesce(r.batch_in, 0), coalesce(r.batch_out, 0),
                    t.input_per_million, t.output_per_million, t.batch_discount) AS cost
FROM run_targets t
LEFT JOIN (
    SELECT target, count(*) AS total,
           count(*) FILTER (WHERE status = 'pending') AS pending,
           count(*) FILTER (WHERE status = 'processing') AS processing,
           count(*) FILTER (WHERE status = 'completed') AS completed,
           count(*) FILTER (WHERE status = 'failed' AND next_attempt_at IS NULL) AS failed,
           count(*) FILTER (WHERE status = 'failed' AND next_attempt_at IS NOT NULL) AS retrying,
           count(*) FILTER (WHERE status = 'completed'
                              AND completed_at > now() - make_interval(secs => :window_seconds))
               AS recent,
           sum(deferrals)::bigint AS deferrals
    FROM analysis_queue WHERE run_id = :run_id GROUP BY target
) q ON q.target = t.target
LEFT JOIN (
    SELECT target,
           percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms) AS latency_p50_ms,
           percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms) AS latency_p95_ms,
           percentile_cont(0.99) WITHIN GROUP (ORDER BY latency_ms) AS latency_p99_ms,
           sum(tokens_in)::bigint AS tokens_in, sum(tokens_out)::bigint AS tokens_out,
           sum(tokens_in) FILTER (WHERE via_batch)::bigint AS batch_in,
           sum(tokens_out) FILTER (WHERE via_batch)::bigint AS batch_out
    FROM analysis_results WHERE run_id = :run_id GROUP BY target
) r ON r.target = t.target
WHERE t.run_id = :run_id
ORDER BY t.target;

-- name: dashboard_failed_items
-- The newest failed items of a run with the first :excerpt_chars characters of their prompt.
SELECT q.id, p.external_id, q.target, q.attempts, q.error_class, q.error_message,
       q.updated_at, q.next_attempt_at IS NOT NULL AS will_retry,
       left(p.text, :excerpt_chars) AS prompt_excerpt, length(p.text) AS prompt_chars
FROM analysis_queue q JOIN prompts p ON p.id = q.prompt_tracking_id
WHERE q.run_id = :run_id AND q.status = 'failed'
ORDER BY q.updated_at DESC, q.id DESC
LIMIT :limit;

-- name: dashboard_stuck_items
-- Processing items of a run whose lease expired or that were not updated for
-- :older_than_seconds seconds.
SELECT q.id, p.external_id, q.target, q.attempts, q.lease_owner, q.lease_expires_at,
       q.updated_at
FROM analysis_queue q JOIN prompts p ON p.id = q.prompt_tracking_id
WHERE q.run_id = :run_id AND q.status = 'processing'
  AND (q.lease_expires_at < now()
       OR q.updated_at < now() - make_interval(secs => :older_than_seconds))
ORDER BY q.updated_at, q.id
LIMIT :limit;

-- name: provider_outcomes
-- Items of a run per target by the outcome of their latest provider call: 'ok' for
-- completed, else the class of the last error; 429 deferrals summed (they burn no attempt).
SELECT target,
       CASE WHEN status = 'completed' THEN 'ok' ELSE error_class END AS outcome,
       count(*) AS items, coalesce(sum(deferrals), 0)::bigint AS deferrals
FROM analysis_queue
WHERE run_id = :run_id AND (status = 'completed' OR error_class IS NOT NULL OR deferrals > 0)
GROUP BY 1, 2;

-- name: provider_latency
-- Successful provider calls of a run per target and latency bucket (:bounds: upper bounds in
-- seconds, ascending; bucket i counts latencies in [bound i-1, bound i)), with their sum.
SELECT target, width_bucket(latency_ms / 1000.0, :bounds::double precision[]) AS bucket,
       count(*) AS calls, sum(latency_ms) / 1000.0 AS seconds
FROM analysis_results
WHERE run_id = :run_id
GROUP BY 1, 2;

-- ---------------------------------------------------------------------------------------
-- Batch submit in bounded memory: the prompts of a submission read in pages
-- (analysisq.worker.batch_send)
-- ---------------------------------------------------------------------------------------

-- name: batch_prompt_page
-- The prompts of those of items :ids still waiting in submission :submission_id, in id order:
-- a row per waiting item, with its text while the texts before it stay under :max_bytes bytes
-- (the first always has it), NULL after (read by the next page). One statement, no cursor:
-- each page is its own transaction, as behind PgBouncer in transaction mode. octet_length
-- reads a stored text's size without detoasting it, and CASE fetches only the texts sent.
SELECT page.id,
       CASE WHEN sum(octet_length(page.text)) OVER (ORDER BY page.id)
                 - octet_length(page.text) < :max_bytes
            THEN page.text END AS text
FROM (
    SELECT q.id, p.text
    FROM analysis_queue q JOIN prompts p ON p.id = q.prompt_tracking_id
    -- The page's items through the primary key, the submission tested on each row (an item
    -- with a submission is processing: submission_only_while_processing). Through the
    -- submission's or the lease index instead, a prepared plan made on stale statistics read
    -- and sorted the whole submission for each page: 1 s a page of 50,000-item batches.
    WHERE q.id = ANY (:ids::bigint[]) AND coalesce(q.submission_id, 0) = :submission_id
) page
ORDER BY page.id;

-- name: batch_sending
-- Submission :submission_id (an intent, fenced by owner :worker) is about to be sent with
-- :item_count requests (what fitted and what the budget covers, no more than it claimed):
-- what a reconciliation after a crash looks for (an Anthropic batch is known by its number
-- of requests). No row: the submission is no longer ours, and it must not be sent.
UPDATE batch_submissions SET item_count = :item_count, updated_at = now()
WHERE id = :submission_id AND lease_owner = :worker AND state = 'intent'
RETURNING id;

-- ---------------------------------------------------------------------------------------
-- Batch submit throughput: what did not fit a batch goes back in one statement
-- (analysisq.worker.batch_send)
-- ---------------------------------------------------------------------------------------

-- name: batch_spill
-- Items :ids of a submission, under claims :tokens (in the same order), that did not fit its
-- batch go back to pending unspent (not an attempt), in one statement whatever their number:
-- `release` for each of them, fenced the same way (the claim, still processing). Returns the
-- ids released.
UPDATE analysis_queue q SET
    status = 'pending', attempts = greatest(q.attempts - 1, 0),
    next_attempt_at = now(),
    lease_owner = NULL, lease_expires_at = NULL, claim_token = NULL, submission_id = NULL,
    updated_at = now()
FROM unnest(:ids::bigint[], :tokens::uuid[]) AS s(id, token)
WHERE q.id = s.id AND q.claim_token = s.token AND q.status = 'processing'
RETURNING q.id;

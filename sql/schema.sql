-- The canonical schema: what a database migrated to the latest version looks like.
-- tests/db/test_schema.py proves that sql/migrations produce exactly this database.
-- Change it together with a new migration, never alone.

CREATE DOMAIN queue_status AS text
    CHECK (VALUE IN ('pending', 'processing', 'completed', 'failed'));

CREATE DOMAIN error_class AS text
    CHECK (VALUE IN ('transient', 'rate_limited', 'permanent', 'auth', 'invalid_input',
                     'poison', 'lease_lost'));

CREATE TABLE prompts (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    external_id text        NOT NULL UNIQUE CHECK (length(external_id) BETWEEN 1 AND 512),
    text        text        NOT NULL CHECK (length(btrim(text)) > 0),
    tags        text[]      NOT NULL DEFAULT '{}',
    active      boolean     NOT NULL DEFAULT true,
    metadata    jsonb       NOT NULL DEFAULT '{}',
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX prompts_tags_idx ON prompts USING gin (tags);
CREATE INDEX prompts_active_idx ON prompts (id) WHERE active;

CREATE TABLE analysis_runs (
    id                text        PRIMARY KEY CHECK (length(id) BETWEEN 1 AND 253),
    name              text        NOT NULL,
    spec              jsonb       NOT NULL,
    max_attempts      integer     NOT NULL DEFAULT 3 CHECK (max_attempts BETWEEN 1 AND 20),
    max_lease_losses  integer     NOT NULL DEFAULT 3 CHECK (max_lease_losses BETWEEN 1 AND 20),
    lease_seconds     integer     NOT NULL DEFAULT 60 CHECK (lease_seconds BETWEEN 5 AND 3600),
    filled_at         timestamptz,
    finished_at       timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now(),
    -- The budget (spec.budget) and what the run has spent (answers) and reserved (requests
    -- in flight); budget_exhausted_at is set when a request did not fit, cleared when the
    -- budget changes.
    max_cost          double precision CHECK (max_cost > 0),
    max_tokens        bigint      CHECK (max_tokens > 0),
    spent_tokens      bigint      NOT NULL DEFAULT 0 CHECK (spent_tokens >= 0),
    spent_cost        double precision NOT NULL DEFAULT 0 CHECK (spent_cost >= 0),
    reserved_tokens   bigint      NOT NULL DEFAULT 0 CHECK (reserved_tokens >= 0),
    reserved_cost     double precision NOT NULL DEFAULT 0 CHECK (reserved_cost >= 0),
    budget_exhausted_at timestamptz,
    -- when `analysisq prune` removed the run's queue rows (its results may remain)
    pruned_at         timestamptz
);
CREATE INDEX analysis_runs_name_idx ON analysis_runs (name, created_at DESC);

-- One row per rate-limit pool (sql/migrations/0004): the aggregate limiter, GCRA. Each
-- request reserves the slot rate_tat and pushes it by 1/rate, and token_tat by its tokens.
-- A target naming rateLimit.pool shares its row with every run naming it; a target without
-- one gets a private pool 'run:<run id>:<target>' (':' never occurs in a DNS label).
CREATE TABLE rate_pools (
    name                text        PRIMARY KEY CHECK (length(name) BETWEEN 1 AND 330),
    requests_per_second double precision CHECK (requests_per_second > 0),
    tokens_per_minute   integer     CHECK (tokens_per_minute > 0),
    rate_tat            timestamptz NOT NULL DEFAULT '-infinity',
    token_tat           timestamptz NOT NULL DEFAULT '-infinity',
    -- A provider's Retry-After (or its rate-limit headers): nobody sends before this.
    blocked_until       timestamptz NOT NULL DEFAULT '-infinity',
    -- Seconds the token schedule has been pushed back by answers that cost more than they
    -- reserved (a running sum): a request holding an earlier slot waits out what was added
    -- since it reserved, so the correction reaches requests already scheduled.
    token_debt          double precision NOT NULL DEFAULT 0,
    -- The slots claims promised to the items they handed out, until the items' attempts
    -- reserve them (0010, analysisq_complete_and_claim): a claim counts those of the claims
    -- just before it.
    claim_tat           timestamptz NOT NULL DEFAULT '-infinity'
);

-- One row per (run, target): its pause state (auth failures), its pool, its prices.
CREATE TABLE run_targets (
    run_id          text        NOT NULL REFERENCES analysis_runs (id) ON DELETE CASCADE,
    target          text        NOT NULL,
    requests_per_second double precision CHECK (requests_per_second > 0),
    tokens_per_minute   integer CHECK (tokens_per_minute > 0),
    paused_at       timestamptz,
    pause_reason    text,
    pool            text        NOT NULL,
    -- Prices in currency units per million tokens (the spec's targets[].pricing).
    input_per_million  double precision CHECK (input_per_million >= 0),
    output_per_million double precision CHECK (output_per_million >= 0),
    batch_discount     double precision CHECK (batch_discount >= 0 AND batch_discount <= 1),
    PRIMARY KEY (run_id, target),
    CHECK ((paused_at IS NULL) = (pause_reason IS NULL)),
    CONSTRAINT run_targets_pool_fkey FOREIGN KEY (pool) REFERENCES rate_pools (name),
    -- The circuit breaker (0003): a streak of the same target-wide permanent answer.
    fault_threshold integer NOT NULL DEFAULT 3 CHECK (fault_threshold BETWEEN 1 AND 100),
    fault           text,
    fault_streak    integer NOT NULL DEFAULT 0 CHECK (fault_streak >= 0),
    fault_items     bigint[] NOT NULL DEFAULT '{}',
    CONSTRAINT fault_has_streak CHECK ((fault IS NULL) = (fault_streak = 0))
);
CREATE INDEX run_targets_pool_idx ON run_targets (pool);

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
    -- tokens reserved from the run's budget for the batch (NULL: none yet, or no budget);
    -- released when the submission is done
    reserved_tokens_in  bigint    CHECK (reserved_tokens_in >= 0),
    reserved_tokens_out bigint    CHECK (reserved_tokens_out >= 0),
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

CREATE TABLE analysis_queue (
    -- ids handed out 1,000 at a time per session (migration 0014: a fill's nextval per row)
    id                 bigint       GENERATED ALWAYS AS IDENTITY (CACHE 1000) PRIMARY KEY,
    run_id             text         NOT NULL,
    -- references prompts (id) and, with run_id, run_targets (run_id, target), checked by
    -- the triggers below (migration 0011) instead of foreign keys
    prompt_tracking_id bigint       NOT NULL,
    target             text         NOT NULL,
    status             queue_status NOT NULL DEFAULT 'pending',
    attempts           integer      NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    error_message      text,
    error_class        error_class,
    next_attempt_at    timestamptz  DEFAULT now(),
    lease_owner        text,
    lease_expires_at   timestamptz,
    claim_token        uuid,
    lease_losses       integer      NOT NULL DEFAULT 0 CHECK (lease_losses >= 0),
    deferrals          integer      NOT NULL DEFAULT 0 CHECK (deferrals >= 0),
    created_at         timestamptz  NOT NULL DEFAULT now(),
    updated_at         timestamptz  NOT NULL DEFAULT now(),
    completed_at       timestamptz,
    -- Bulk retry (0003): the error that had failed the item for good, and how often.
    last_error         text,
    retries            integer      NOT NULL DEFAULT 0 CHECK (retries >= 0),
    -- the provider batch the item waits in (targets[].mode: batch)
    submission_id      bigint       REFERENCES batch_submissions (id) ON DELETE SET NULL,
    -- the lost leases that point at the item itself (see cleanup_stuck_queue_items)
    lone_losses        integer      NOT NULL DEFAULT 0
                                    CHECK (lone_losses >= 0 AND lone_losses <= lease_losses),
    UNIQUE (run_id, prompt_tracking_id, target),
    -- A claim exists exactly while the item is processing.
    CONSTRAINT processing_has_lease CHECK (
        (status = 'processing')
        = (lease_owner IS NOT NULL AND lease_expires_at IS NOT NULL AND claim_token IS NOT NULL)
    ),
    CONSTRAINT submission_only_while_processing
        CHECK (submission_id IS NULL OR status = 'processing'),
    CONSTRAINT completed_has_time CHECK ((status = 'completed') = (completed_at IS NOT NULL)),
    CONSTRAINT failed_has_reason CHECK (
        status <> 'failed' OR (error_message IS NOT NULL AND error_class IS NOT NULL)
    ),
    -- Only pending and retryable failed items wait for a next attempt.
    CONSTRAINT next_attempt_only_when_waiting CHECK (
        (status = 'pending' AND next_attempt_at IS NOT NULL)
        OR status = 'failed'
        OR (status IN ('processing', 'completed') AND next_attempt_at IS NULL)
    )
);
-- The claim's index: claimable items of a run in the order they are served.
CREATE INDEX analysis_queue_claim_idx
    ON analysis_queue (run_id, (status = 'failed'), next_attempt_at)
    WHERE status IN ('pending', 'failed') AND next_attempt_at IS NOT NULL;
-- The claim's scan for suspects (items that lost a lease): few rows, so that looking for
-- them costs nothing when there are none (the claim index would walk every due item).
CREATE INDEX analysis_queue_suspect_idx
    ON analysis_queue (run_id, (status = 'failed'), next_attempt_at)
    WHERE status IN ('pending', 'failed') AND next_attempt_at IS NOT NULL AND lease_losses > 0;
-- The rescuer's index: leases that may have expired.
CREATE INDEX analysis_queue_lease_idx ON analysis_queue (lease_expires_at)
    WHERE status = 'processing';
-- The runbook's newest failed items (the seed's query, `analysisq failed`) and the failed
-- errors' summaries, over the whole table; failed rows only (migration 0011): the stuck
-- queries read analysis_queue_lease_idx, the counts by status read the whole table anyway.
CREATE INDEX analysis_queue_status_idx ON analysis_queue (updated_at) WHERE status = 'failed';
CREATE INDEX analysis_queue_submission_idx ON analysis_queue (submission_id)
    WHERE submission_id IS NOT NULL;

CREATE TABLE analysis_results (
    id                 bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- no foreign key: results may outlive their queue rows (retention); one result per item
    queue_id           bigint      NOT NULL UNIQUE,
    run_id             text        NOT NULL,
    prompt_tracking_id bigint      NOT NULL,
    target             text        NOT NULL,
    model              text        NOT NULL,
    response_text      text        NOT NULL,
    parsed             jsonb,
    tokens_in          integer     CHECK (tokens_in >= 0),
    tokens_out         integer     CHECK (tokens_out >= 0),
    latency_ms         double precision NOT NULL CHECK (latency_ms >= 0),
    attempt            integer     NOT NULL CHECK (attempt >= 1),
    -- answered through a provider batch (priced at the batch discount)
    via_batch          boolean     NOT NULL DEFAULT false,
    created_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX analysis_results_run_idx ON analysis_results (run_id, id);

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

-- What tokens cost at a target's prices per million (NULL when the target has no pricing),
-- less the share p_discount takes off (the batch discount; NULL or 0: full price).
-- The one formula: totals, exports and budget reservations all call it.
CREATE FUNCTION token_cost(
    p_tokens_in bigint, p_tokens_out bigint,
    p_input_per_million double precision, p_output_per_million double precision,
    p_discount double precision DEFAULT 0
) RETURNS double precision
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN p_input_per_million IS NULL AND p_output_per_million IS NULL THEN NULL
        ELSE (coalesce(p_tokens_in, 0) * coalesce(p_input_per_million, 0)
              + coalesce(p_tokens_out, 0) * coalesce(p_output_per_million, 0)) / 1e6
             * (1 - coalesce(p_discount, 0)) END
$$;

-- Waiting items a claim found with no attempt left (maxAttempts was lowered after they were
-- last tried) end failed for good: both claims call this (migration 0009).
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

-- How far ahead, in seconds, a rate pool's schedule may be for the claim to hand out its
-- items: what a claimed item waits for its slot at most. Two seconds: a worker claims again
-- with every write of answers and, when idle, every poll (poll_seconds x 0.5-1.5, 0.75 s at
-- most by default), so more than a second of a pool's schedule stays reserved ahead of any
-- worker's next claim and one worker alone keeps the pool busy; a worker killed leaves at
-- most two seconds of the pool's slots unused.
CREATE FUNCTION rate_claim_horizon() RETURNS double precision
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT 2.0::double precision $$;

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
-- Rows with written = true are the completed ids; the others are the new claims. One UPDATE
-- of analysis_queue writes both (migration 0012), on disjoint rows: the answers only items
-- processing under the writer's token, the claims only waiting ones.
-- A PL/pgSQL function with its generic plan forced, not a statement sent each time: the
-- server plans it once per connection and keeps the plan, also behind a pooler in transaction
-- mode, where no prepared statement survives and a statement sent as such was parsed and
-- planned on every execution (planning cost as much as running it: docs/benchmarks.md). The
-- generic plan is the right one: every scan is an index scan bounded by the run and the
-- LIMIT, whatever the values.
-- A claim for a run with targets limited by requestsPerSecond first locks their pools' rows
-- (in name order: two runs sharing two pools cannot deadlock), so that it reads their
-- schedule and promises (claim_tat) as the claim before it left them: the room it computes
-- is exact across workers. The lock is held for the statement's few milliseconds; a claim of
-- a run without such targets takes none.
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

-- The queue's references (migration 0011): a queue row's prompt and run target exist, a
-- referenced prompt cannot be deleted, a deleted run target takes its queue rows with it --
-- what foreign keys guaranteed, checked once per statement instead of once per row (the
-- 1M-item fill spent most of its time in the RI triggers). Concurrent deletes wait for the
-- inserting transaction (a FOR KEY SHARE lock on the run targets, one transaction-scoped
-- lock for the prompts) and then see its rows. The parents' side checks the latest committed
-- rows only at READ COMMITTED; at a higher isolation level it refuses (see the migration).
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
-- Skipped for analysisq_fill_run's own statements at READ COMMITTED (migration 0013), which
-- select every row from prompts after that lock and check the targets first: the call stack
-- proves it, not a setting a client could change. The innermost caller frame must be that
-- function at one of its SQL statements and nothing may run outside it (the last line of the
-- context is written by the outermost frame, so no statement text can forge it), and no
-- other trigger may sit in between (pg_trigger_depth() = 1). Any other INSERT, from any
-- client or function, is checked in full.
CREATE FUNCTION analysisq_queue_refs_inserted() RETURNS trigger
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

CREATE TRIGGER analysis_queue_refs_inserted
    AFTER INSERT ON analysis_queue REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION analysisq_queue_refs_inserted();

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

CREATE TABLE IF NOT EXISTS analysisq_migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

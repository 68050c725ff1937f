-- Quotas, cost and budgets (issue 12): rate-limit pools shared across runs, a Retry-After
-- block every acquire respects, per-target prices, and a run's token and cost budget.

-- One row per rate-limit pool. A target that names rateLimit.pool shares the pool's row with
-- every target of every run naming it; a target without one gets a private pool
-- 'run:<run id>:<target>' (':' is not in a DNS label, so it never meets a named pool).
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
    token_debt          double precision NOT NULL DEFAULT 0
);

INSERT INTO rate_pools (name, requests_per_second, tokens_per_minute, rate_tat, token_tat)
SELECT 'run:' || run_id || ':' || target, requests_per_second, tokens_per_minute,
       rate_tat, token_tat
FROM run_targets;

ALTER TABLE run_targets ADD COLUMN pool text;
UPDATE run_targets SET pool = 'run:' || run_id || ':' || target;
ALTER TABLE run_targets ALTER COLUMN pool SET NOT NULL;
ALTER TABLE run_targets ADD CONSTRAINT run_targets_pool_fkey
    FOREIGN KEY (pool) REFERENCES rate_pools (name);
CREATE INDEX run_targets_pool_idx ON run_targets (pool);
ALTER TABLE run_targets DROP COLUMN rate_tat;
ALTER TABLE run_targets DROP COLUMN token_tat;

-- Prices in currency units per million tokens (the spec's targets[].pricing).
ALTER TABLE run_targets ADD COLUMN input_per_million double precision
    CHECK (input_per_million >= 0);
ALTER TABLE run_targets ADD COLUMN output_per_million double precision
    CHECK (output_per_million >= 0);
ALTER TABLE run_targets ADD COLUMN batch_discount double precision
    CHECK (batch_discount >= 0 AND batch_discount <= 1);

-- The run's budget and what it has spent (answers) and reserved (requests in flight).
ALTER TABLE analysis_runs ADD COLUMN max_cost double precision CHECK (max_cost > 0);
ALTER TABLE analysis_runs ADD COLUMN max_tokens bigint CHECK (max_tokens > 0);
ALTER TABLE analysis_runs ADD COLUMN spent_tokens bigint NOT NULL DEFAULT 0
    CHECK (spent_tokens >= 0);
ALTER TABLE analysis_runs ADD COLUMN spent_cost double precision NOT NULL DEFAULT 0
    CHECK (spent_cost >= 0);
ALTER TABLE analysis_runs ADD COLUMN reserved_tokens bigint NOT NULL DEFAULT 0
    CHECK (reserved_tokens >= 0);
ALTER TABLE analysis_runs ADD COLUMN reserved_cost double precision NOT NULL DEFAULT 0
    CHECK (reserved_cost >= 0);
-- Set when a request did not fit the budget; cleared when the budget changes.
ALTER TABLE analysis_runs ADD COLUMN budget_exhausted_at timestamptz;

-- What tokens cost at a target's prices per million (NULL when the target has no pricing).
-- The one formula: totals, exports and budget reservations all call it.
CREATE FUNCTION token_cost(
    p_tokens_in bigint, p_tokens_out bigint,
    p_input_per_million double precision, p_output_per_million double precision
) RETURNS double precision
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN p_input_per_million IS NULL AND p_output_per_million IS NULL THEN NULL
        ELSE (coalesce(p_tokens_in, 0) * coalesce(p_input_per_million, 0)
              + coalesce(p_tokens_out, 0) * coalesce(p_output_per_million, 0)) / 1e6 END
$$;

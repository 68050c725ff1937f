-- 0008_batch_discount: answers through a provider batch are priced at the batch discount,
-- and a run's budget covers its provider batches.
--
-- token_cost takes the share taken off (targets[].pricing.batchDiscount for an answer with
-- via_batch, else nothing): still the one formula for totals, exports and budgets. The
-- four-argument calls keep their meaning (no discount). A submission records the tokens it
-- reserved from the run's budget before it was sent, released when it finishes.

DROP FUNCTION token_cost(bigint, bigint, double precision, double precision);

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

-- Tokens reserved from the run's budget for the batch (NULL: none yet, or no budget);
-- released when the submission is done.
ALTER TABLE batch_submissions
    ADD COLUMN reserved_tokens_in bigint CHECK (reserved_tokens_in >= 0),
    ADD COLUMN reserved_tokens_out bigint CHECK (reserved_tokens_out >= 0);

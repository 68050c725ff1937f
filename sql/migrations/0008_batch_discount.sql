-- 0008_batch_discount: answers through a provider batch are priced at the batch discount.
--
-- token_cost takes the share taken off (targets[].pricing.batchDiscount for an answer with
-- via_batch, else nothing): still the one formula for totals, exports and budgets. The
-- four-argument calls keep their meaning (no discount).

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

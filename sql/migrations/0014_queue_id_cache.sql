-- 0014_queue_id_cache: the queue's identity hands a session its ids 1,000 at a time. With
-- the default cache of 1, every nextval of a 1M-item fill locked the sequence's page and
-- WAL-logged it every 32 values: 0.45 s of a 10.9 s fill (docs/benchmarks.md, "fill").
-- Ids stay increasing within a session, so a fill's items keep the prompts' order; a session
-- that ends leaves a gap of at most 1,000 ids, which nothing reads (queue ids are keys, not a
-- count or a watermark). Metadata only: no rewrite, a short lock of the sequence.
ALTER TABLE analysis_queue ALTER COLUMN id SET CACHE 1000;

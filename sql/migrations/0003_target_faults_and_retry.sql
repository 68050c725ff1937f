-- 0003_target_faults_and_retry: bulk retry keeps the earlier error; per-target circuit breaker.
--
-- analysis_queue.last_error / retries: `analysisq retry` (and the AnalysisRun's retry
-- annotation) puts failed-for-good items back with their attempts reset; the error that
-- failed them stays readable in last_error, and retries counts how often that happened.
--
-- run_targets.fault_*: the circuit breaker. A target-wide permanent answer (a misspelt model,
-- a wrong endpoint path) fails each item it reaches; fault_streak counts those answers in a
-- row with the same signature (status + code) and no success in between, fault_items are the
-- items the streak failed for good. At fault_threshold the target is paused and those items
-- are given back, parked until the target is resumed.

ALTER TABLE analysis_queue
    ADD COLUMN last_error text,
    ADD COLUMN retries integer NOT NULL DEFAULT 0 CHECK (retries >= 0);

ALTER TABLE run_targets
    ADD COLUMN fault_threshold integer NOT NULL DEFAULT 3
        CHECK (fault_threshold BETWEEN 1 AND 100),
    ADD COLUMN fault text,
    ADD COLUMN fault_streak integer NOT NULL DEFAULT 0 CHECK (fault_streak >= 0),
    ADD COLUMN fault_items bigint[] NOT NULL DEFAULT '{}',
    ADD CONSTRAINT fault_has_streak CHECK ((fault IS NULL) = (fault_streak = 0));

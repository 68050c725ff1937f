-- Retention (`analysisq prune`, docs/retention.md): a finished run's queue rows can be removed
-- while its results are kept, so a result no longer references its queue row by foreign key
-- (UNIQUE (queue_id) still allows one result per item, and the fenced completion writes a
-- result only for the item it completes); deleting a run deletes its results explicitly
-- (`delete_run`). The run records when its queue rows were pruned.
ALTER TABLE analysis_results DROP CONSTRAINT analysis_results_queue_id_fkey;
ALTER TABLE analysis_runs ADD COLUMN pruned_at timestamptz;

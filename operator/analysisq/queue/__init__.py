"""The PostgreSQL work queue: one typed wrapper per named query in ``sql/queries.sql``.

Follow an item: ``runs.create_run`` records a run and its targets, ``runs.fill`` enqueues
prompts x targets (idempotent), ``items.claim`` leases a batch (``FOR UPDATE SKIP LOCKED``),
``items.heartbeat`` renews leases, and ``items.complete`` / ``items.fail`` / ``items.release``
end a claim, each fenced by its claim token. ``retry`` decides what an error means for an item,
``ratelimit`` spaces requests per target across every worker, ``rescue`` puts stuck items back,
and ``prune`` removes finished runs' rows past a retention horizon.
The state vocabulary is ``states.ItemStatus``, the same as the database's ``queue_status``.
"""

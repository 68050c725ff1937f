"""Deleting an AnalysisRun whose provider batches are still open: cancel, ingest, let go.

A run with ``mode: batch`` targets carries the operator's finalizer. On delete,
``RunService.delete_rows`` (``onDelete: Delete``) and the ``cancel-batches`` handler
(``onDelete: Keep``) call ``close_batches`` until it reports none open:

1. the run's workers are scaled to 0: their drivers call ``/cancel`` for what is marked and
   hand their submissions over as they stop;
2. one ``BatchDriver.drain`` pass runs in the operator, with the targets' API keys from
   their Secrets (the same the workers mount): every open submission is marked
   ``delete``, an intent is reconciled with the provider (a batch sent just before a crash
   is found and cancelled too), a sent batch is cancelled, and an ended one is ingested
   (its partial results written once, the rest back unspent).

Only then do the rows go (``queue.runs.delete_run`` refuses while a batch is open) or, with
``onDelete: Keep``, stay with every answer the provider gave. An operator that dies between
two passes runs the next one after its restart (the finalizer is still there): nothing is
lost and no paid batch is left running unknown.
"""

from __future__ import annotations

import asyncpg

from analysisq.db.connect import acquire
from analysisq.errors import RunNotFound
from analysisq.kube.kubeapi import KubeApi
from analysisq.kube.ref import RunRef
from analysisq.providers import BatchClient, make_batch_client, make_http_client
from analysisq.queue import batches, runs
from analysisq.queue.batches import OpenBatch
from analysisq.queue.retry import RetryPolicy
from analysisq.settings import Settings
from analysisq.spec import AnalysisRunSpec
from analysisq.worker.batch import BatchDriver
from analysisq.worker.batch_plan import batch_targets

#: Seconds between two passes while batches are being cancelled.
PASS_SECONDS = 10.0


def has_batch_targets(spec: AnalysisRunSpec) -> bool:
    return bool(batch_targets(spec))


def pass_seconds(spec: AnalysisRunSpec) -> float:
    """How long to wait for the next pass: the targets' poll interval, at most 10 s."""
    polls = [t.batch.poll_seconds for t in batch_targets(spec)]
    return max(1.0, min([PASS_SECONDS, *polls]))


async def close_batches(
    kube: KubeApi, pool: asyncpg.Pool, ref: RunRef, spec: AnalysisRunSpec, settings: Settings
) -> list[OpenBatch]:
    """One pass (see the module docstring); the run's batches still open after it."""
    async with acquire(pool) as conn:
        try:
            run = await runs.get_run(conn, ref.run_id)
        except RunNotFound:
            return []
        if not await batches.open_batches(conn, run.id):
            return []
    await kube.scale_deployment(ref.namespace, ref.deployment_name, 0)
    keys: dict[str, str | None] = {}
    for target in batch_targets(run.spec):
        secret = target.api_key_secret_ref
        keys[target.name] = await kube.secret_value(ref.namespace, secret) if secret else None
    policy = RetryPolicy(
        base_seconds=settings.retry_base_seconds,
        cap_seconds=settings.retry_cap_seconds,
        max_deferrals=settings.max_deferrals,
    )
    timeout = max(t.timeout_seconds for t in run.spec.targets)
    http = make_http_client(timeout_s=timeout, max_connections=10)
    try:
        clients: dict[str, BatchClient] = {
            t.name: make_batch_client(t, http, keys[t.name]) for t in batch_targets(run.spec)
        }
        driver = BatchDriver(pool, run, clients, name=f"operator/{ref.uid}", policy=policy)
        if not await driver.drain("delete"):
            return []
    finally:
        await http.aclose()
    async with acquire(pool) as conn:
        return await batches.open_batches(conn, run.id)


def describe(open_: list[OpenBatch]) -> str:
    """``2 provider batches (batch_abc at cheap, intent 7 at fast)`` for an Event."""
    names = [f"{b.provider_batch_id or f'intent {b.id}'} at {b.target}" for b in open_[:5]]
    more = f", and {len(open_) - 5} more" if len(open_) > 5 else ""
    return f"{len(open_)} provider batches ({', '.join(names)}{more})"

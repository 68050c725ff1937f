"""One reconciliation's reading of the queue: a run's counts, spending and targets.

``observe_run`` reads what ``reconciled`` (``kube.status``) needs from the database through
the queue layer, in one connection, and records the provider metrics that are due on the
way (``kube.provider_metrics``); ``RunService.reconcile`` adds what the workers' Deployment
says and turns the whole into status.
"""

from __future__ import annotations

import asyncpg

from analysisq.db.connect import acquire
from analysisq.kube.provider_metrics import LATENCY_BOUNDS, ProviderCollector
from analysisq.kube.ref import RunRef
from analysisq.kube.status import BatchView, Observation, PausedTarget
from analysisq.queue import batches, budget, runs, usage
from analysisq.queue.dashboard import provider_calls
from analysisq.spec import AnalysisRunSpec


async def observe_run(
    pool: asyncpg.Pool, ref: RunRef, spec: AnalysisRunSpec, providers: ProviderCollector
) -> Observation:
    """What the database says of the run; the workers' part (desired, ready, throughput,
    problems) is the caller's to fill in."""
    async with acquire(pool) as conn:
        counts = await runs.counts(conn, ref.run_id)
        spent = await usage.run_usage(conn, ref.run_id)
        run_budget = await budget.state(conn, ref.run_id)
        states = await runs.targets(conn, ref.run_id)
        if providers.due(ref):
            calls = await provider_calls(conn, ref.run_id, LATENCY_BOUNDS)
            providers.observe_calls(ref, calls)
        batch_view = None
        if any(t.mode == "batch" for t in spec.targets):
            batch_view = BatchView(
                await batches.summary(conn, ref.run_id),
                await batches.open_batches(conn, ref.run_id),
            )
    providers.observe_paused(ref, {t.target: t.paused_at is not None for t in states})
    paused = [
        PausedTarget(t.target, t.pause_reason or "", t.paused_at, t.fault is not None)
        for t in states
        if t.paused_at is not None
    ]
    return Observation(
        counts=counts,
        desired=0,
        ready=0,
        paused=paused,
        throughput=None,
        problems=[],
        usage=spent,
        budget=run_budget,
        batches=batch_view,
    )

"""The operator's rules for one AnalysisRun, independent of kopf.

Each method takes the run (``RunRef``), its validated spec and its current status, does its
work through the queue layer (``analysisq.queue``) and the Kubernetes API (``kubeapi``), and
returns a ``Report`` (``kube.report``: the status fields to patch and the Events to post,
and their wording). The handlers in ``handlers`` call these and write the reports. Errors
stay typed (``analysisq.errors``); whether the operator retries one, and under which
``Degraded`` reason, is in the error's class (``retryable``, ``reason``). What the worker
Deployment's status means is ``kube.rollout``.

Nothing here loses an item: filling is idempotent (``runs.fill``), stopping workers releases
their claims, and a run whose database is unreachable simply waits.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, Literal

import asyncpg

from analysisq.db.connect import acquire
from analysisq.errors import AnalysisqError, ConfigError, KubeApiError, NotYet
from analysisq.kube.batch_cancel import close_batches, has_batch_targets
from analysisq.kube.databases import DatabasePools
from analysisq.kube.deployment import database_ref, desired_replicas, worker_deployment
from analysisq.kube.kubeapi import KubeApi
from analysisq.kube.metrics import Metrics
from analysisq.kube.observe import observe_run
from analysisq.kube.podhealth import workers_problem
from analysisq.kube.ref import RunRef
from analysisq.kube.report import (
    Note,
    Report,
    Status,
    degraded_report,
    filled_notes,
    missing_prompts_note,
    problem_of,
    scale_note,
    stuck_reset_report,
    transition_notes,
)
from analysisq.kube.retries import RETRY_ANNOTATION, last_retry, parse_retry_request, reopened
from analysisq.kube.rollout import old_pods_gone, ready_replicas, rolled_out, spec_replicas
from analysisq.kube.status import (
    FILLED,
    FILLING,
    FINISHED,
    RUNNING,
    SUCCEEDED,
    SUSPENDED,
    Problem,
    changed,
    degraded,
    is_true,
    reconciled,
    set_condition,
    summary,
    timestamp,
)
from analysisq.queue import batches, rescue, retries, runs
from analysisq.queue.batches import OpenBatch
from analysisq.queue.throughput import OPERATOR_WINDOW_SECONDS, RateMeter
from analysisq.settings import Settings
from analysisq.spec import AnalysisRunSpec

log = logging.getLogger("analysisq.operator")


def _idle(status: Status) -> bool:
    """A finished run, or one not filled yet: a spec change has nothing to act on (``ensure``
    applies the right workers once the run is filled)."""
    return status.get("phase") in FINISHED or not is_true(status, FILLED)


class RunService:
    def __init__(
        self, settings: Settings, kube: KubeApi, pools: DatabasePools, metrics: Metrics
    ) -> None:
        self.settings = settings
        self.kube = kube
        self.pools = pools
        self.metrics = metrics
        self._meters: dict[str, RateMeter] = {}
        #: (run uid, resume token) -> when its rollout was first seen complete.
        self._rolled_out_at: dict[tuple[str, str | None], float] = {}

    # --- helpers ---------------------------------------------------------------------------

    async def _pool(self, ref: RunRef, spec: AnalysisRunSpec) -> asyncpg.Pool:
        """The run's database: the URL in its Secret, the same the workers get."""
        url = await self.kube.secret_value(ref.namespace, database_ref(spec, self.settings))
        return await self.pools.get(url)

    async def _check_key_secrets(self, ref: RunRef, spec: AnalysisRunSpec) -> None:
        for target in spec.targets:
            if target.api_key_secret_ref:
                await self.kube.check_secret(ref.namespace, target.api_key_secret_ref)

    async def _apply(
        self, ref: RunRef, spec: AnalysisRunSpec, replicas: int, resume_token: str | None
    ) -> None:
        manifest = worker_deployment(
            ref, spec, self.settings, replicas=replicas, resume_token=resume_token
        )
        await self.kube.apply_deployment(manifest)

    async def _run_workers(
        self, ref: RunRef, spec: AnalysisRunSpec, resume_token: str | None
    ) -> int:
        """Apply the worker Deployment at the scale of an unfinished run; its replicas."""
        replicas = desired_replicas(spec, finished=False)
        await self._apply(ref, spec, replicas, resume_token)
        return replicas

    def _meter(self, ref: RunRef) -> RateMeter:
        return self._meters.setdefault(ref.uid, RateMeter(OPERATOR_WINDOW_SECONDS))

    # --- create / resume -------------------------------------------------------------------

    async def ensure(
        self, ref: RunRef, spec: AnalysisRunSpec, status: Status, resume_token: str | None
    ) -> Report:
        """Record the run, fill its queue once, and run its worker Deployment."""
        if status.get("phase") in FINISHED:
            # A finished run keeps its workers at zero, also across operator restarts.
            await self.kube.scale_deployment(ref.namespace, ref.deployment_name, 0)
            return Report()
        await self._check_key_secrets(ref, spec)
        pool = await self._pool(ref, spec)
        report = Report()
        conditions = list(status.get("conditions") or [])
        async with acquire(pool) as conn:
            await runs.create_run(conn, ref.run_id, spec, name=ref.display_name)
            run = await runs.get_run(conn, ref.run_id)
            if run.filled_at is None:
                await self.kube.patch_run_status(ref, {"phase": FILLING, "runId": ref.run_id})
                began = time.monotonic()
                result = await runs.fill(conn, ref.run_id, spec)
                log.info(
                    "queue filled",
                    extra={
                        "run": ref.run_id,
                        "inserted": result.inserted,
                        "seconds": round(time.monotonic() - began, 3),
                    },
                )
                if result.missing_ids:
                    report.notes.append(missing_prompts_note(result.missing_ids))
            if not is_true(status, FILLED):
                counts = await runs.counts(conn, ref.run_id)
                message = f"{counts.total} items queued"
                conditions = set_condition(conditions, FILLED, True, "Filled", message)
                report.notes += filled_notes(message, counts.total)
        await self._run_workers(ref, spec, resume_token)
        report.status = {
            "runId": ref.run_id,
            "phase": SUSPENDED if spec.suspend else RUNNING,
            "observedGeneration": ref.generation,
            "startedAt": status.get("startedAt") or timestamp(),
            "conditions": degraded(conditions, []),
        }
        return report

    # --- spec changes ----------------------------------------------------------------------

    async def rescale(
        self, ref: RunRef, spec: AnalysisRunSpec, status: Status, resume_token: str | None
    ) -> Report:
        """``workers`` or ``suspend`` changed: scale the Deployment (the database only to
        mark a suspended run's open provider batches for cancelling)."""
        if _idle(status):
            return Report()
        replicas = desired_replicas(spec, finished=False)
        was_suspended = status.get("phase") == SUSPENDED
        if spec.suspend and not was_suspended and any(t.mode == "batch" for t in spec.targets):
            # Before the scale-down: the stopping workers cancel what is marked (its partial
            # results are ingested on resume).
            pool = await self._pool(ref, spec)
            async with acquire(pool) as conn:
                await batches.cancel_open(conn, ref.run_id, "suspend")
        await self._apply(ref, spec, replicas, resume_token)
        note = scale_note(spec.suspend, was_suspended, replicas)
        workers = dict(status.get("workers") or {}, desired=replicas)
        return Report(
            {
                "phase": SUSPENDED if spec.suspend else RUNNING,
                "workers": workers,
                "observedGeneration": ref.generation,
            },
            [note],
        )

    async def reconfigure(
        self, ref: RunRef, spec: AnalysisRunSpec, status: Status, resume_token: str | None
    ) -> Report:
        """Other spec fields changed: record them; workers restart if they read them."""
        if _idle(status):
            return Report()
        pool = await self._pool(ref, spec)
        async with acquire(pool) as conn:
            await runs.create_run(conn, ref.run_id, spec, name=ref.display_name)
        await self._run_workers(ref, spec, resume_token)
        return Report({"observedGeneration": ref.generation})

    async def resume_targets(
        self, ref: RunRef, spec: AnalysisRunSpec, status: Status, resume_token: str | None
    ) -> Report:
        """The resume annotation changed: restart the workers (they read API keys at start),
        then resume the paused targets. In that order, and only once the old pods finished
        terminating, so that no worker still holding the old key can pause a target again."""
        if _idle(status):
            return Report()
        await self._run_workers(ref, spec, resume_token)
        deployment = await self.kube.read_deployment(ref.namespace, ref.deployment_name)
        key = (ref.uid, resume_token)
        if deployment is None or not rolled_out(deployment):
            self._rolled_out_at.pop(key, None)
            raise NotYet("waiting for the workers to restart before resuming targets")
        since = self._rolled_out_at.setdefault(key, time.monotonic())
        if not old_pods_gone(deployment, since, time.monotonic()):
            raise NotYet("waiting for the old worker pods to finish terminating")
        self._rolled_out_at.pop(key, None)
        pool = await self._pool(ref, spec)
        async with acquire(pool) as conn:
            resumed = await runs.resume_targets(conn, ref.run_id)
        if not resumed:
            return Report()
        message = f"resumed targets {', '.join(resumed)}; workers restart to re-read API keys"
        return Report({"pausedTargets": None}, [Note("Normal", "TargetsResumed", message)])

    async def retry_failed(
        self,
        ref: RunRef,
        spec: AnalysisRunSpec,
        status: Status,
        resume_token: str | None,
        *,
        value: str,
    ) -> Report:
        """The retry annotation was set: put failed items back; a finished run runs again."""
        try:
            request = parse_retry_request(value, spec)
        except ConfigError as exc:
            message = f"annotation {RETRY_ANNOTATION}={value!r} ignored: {exc.message}"
            return Report({}, [Note("Warning", "RetryRefused", message)])
        if not is_true(status, FILLED):
            message = f"annotation {RETRY_ANNOTATION} ignored: the run is not filled yet"
            return Report({}, [Note("Warning", "RetryRefused", message)])
        pool = await self._pool(ref, spec)
        async with acquire(pool) as conn:
            count = await retries.retry_failed(
                conn,
                ref.run_id,
                error_class=request.error_class,
                target=request.target,
                error=request.error,
            )
        patch: dict[str, Any] = {"lastRetry": last_retry(request, count)}
        message = f"put {count} failed items back in the queue ({request.describe()})"
        if count and status.get("phase") in FINISHED:
            replicas = await self._run_workers(ref, spec, resume_token)
            patch |= reopened(status, spec, count, replicas)
            message += f"; the run runs again with {replicas} workers"
        return Report(patch, [Note("Normal", "ItemsRetried", message)])

    # --- timers ----------------------------------------------------------------------------

    async def reconcile(
        self, ref: RunRef, spec: AnalysisRunSpec, status: Status, resume_token: str | None
    ) -> Report:
        """Counts into status; finish the run when every item is terminal."""
        if not is_true(status, FILLED):
            return Report()  # ensure() is still at work (or retrying)
        began = time.monotonic()
        problems: list[Problem] = []
        try:
            await self._check_key_secrets(ref, spec)
        except AnalysisqError as exc:
            if not exc.retryable:
                raise
            problems.append(problem_of(exc))
        try:
            pool = await self._pool(ref, spec)
            seen = await observe_run(pool, ref, spec, self.metrics.providers)
            deployment = await self.kube.read_deployment(ref.namespace, ref.deployment_name)
        except AnalysisqError as exc:
            if not exc.retryable:
                raise
            problem = problem_of(exc)
            self.metrics.reconcile_errors.labels(problem.reason).inc()
            return degraded_report(status, problem)

        counts = seen.counts
        finishing = counts.done and status.get("phase") not in FINISHED
        desired = desired_replicas(spec, finished=counts.done)
        ready, notes = await self._steer_workers(ref, spec, deployment, desired, resume_token)
        if desired > ready:
            problems += await self._workers_problem(ref)
        seen = replace(
            seen,
            desired=desired,
            ready=min(ready, desired),
            throughput=self._meter(ref).add(counts.terminal),
            problems=problems,
        )
        new = reconciled(status, spec, seen)
        notes += transition_notes(status, new, seen.paused)
        if finishing:
            async with acquire(pool) as conn:
                await runs.mark_finished(conn, ref.run_id)
            kind: Literal["Normal", "Warning"] = (
                "Normal" if new["phase"] == SUCCEEDED else "Warning"
            )
            notes.append(Note(kind, new["phase"], summary(counts)))
            self._meters.pop(ref.uid, None)
        deadline = spec.deadline.timestamp() if spec.deadline else None
        shown = {**status, **new}
        # The number the status shows as text, while it shows one (not once finished).
        rate = seen.throughput if shown.get("throughput") else None
        self.metrics.observe(ref, shown, deadline, rate)
        self.metrics.reconcile_seconds.observe(time.monotonic() - began)
        return Report(changed(status, new), notes)

    async def _steer_workers(
        self,
        ref: RunRef,
        spec: AnalysisRunSpec,
        deployment: Mapping[str, Any] | None,
        desired: int,
        resume_token: str | None,
    ) -> tuple[int, list[Note]]:
        """Bring the worker Deployment to *desired* replicas (recreating a missing one);
        the replicas ready now and the Events of what was done."""
        if deployment is None:
            if desired == 0:
                return 0, []
            await self._apply(ref, spec, desired, resume_token)
            return 0, [Note("Warning", "WorkersRecreated", "the worker Deployment was missing")]
        if spec_replicas(deployment) != desired:
            await self.kube.scale_deployment(ref.namespace, ref.deployment_name, desired)
        return ready_replicas(deployment), []

    async def _workers_problem(self, ref: RunRef) -> list[Problem]:
        """Why workers are not ready, when their pods say (a bad image, a crash loop)."""
        try:
            pods = await self.kube.list_pods(ref.namespace, ref.selector())
        except KubeApiError as exc:
            return [problem_of(exc)]
        problem = workers_problem(pods)
        return [problem] if problem else []

    async def rescue_stuck(self, ref: RunRef, spec: AnalysisRunSpec, status: Status) -> Report:
        """The seed's hourly cleanup, per run: requeue items whose lease expired."""
        if not is_true(status, FILLED):
            return Report()
        pool = await self._pool(ref, spec)
        async with acquire(pool) as conn:
            result = await rescue.rescue_stuck(conn, ref.run_id, spec.stuck_after_seconds)
        if result.reset:
            self.metrics.stuck_reset.labels(ref.namespace, ref.name).inc(result.reset)
        return stuck_reset_report(result.reset, result.poisoned)

    # --- deletion --------------------------------------------------------------------------

    async def delete_rows(self, ref: RunRef, spec: AnalysisRunSpec) -> list[OpenBatch]:
        """``onDelete: Delete``: stop the workers, close the run's provider batches, then
        remove its rows and results. Returns the batches still open (rows kept until none)."""
        pool = await self._pool(ref, spec)
        if has_batch_targets(spec):
            still_open = await close_batches(self.kube, pool, ref, spec, self.settings)
            if still_open:
                return still_open
        await self.kube.scale_deployment(ref.namespace, ref.deployment_name, 0)
        async with acquire(pool) as conn:
            await runs.delete_run(conn, ref.run_id)
        log.info("run rows deleted", extra={"run": ref.run_id})
        return []

    async def close_batches(self, ref: RunRef, spec: AnalysisRunSpec) -> list[OpenBatch]:
        """``onDelete: Keep``: close the run's provider batches (``kube.batch_cancel``);
        the batches still open."""
        pool = await self._pool(ref, spec)
        return await close_batches(self.kube, pool, ref, spec, self.settings)

    async def database_health(self) -> str:
        """For the liveness endpoint (``DatabasePools.health``)."""
        return await self.pools.health(self.settings.database_url)

    def forget(self, ref: RunRef) -> None:
        self._meters.pop(ref.uid, None)
        for key in [k for k in self._rolled_out_at if k[0] == ref.uid]:
            del self._rolled_out_at[key]
        self.metrics.forget(ref)

"""The operator's rules for one AnalysisRun, independent of kopf.

Each method takes the run (``RunRef``), its validated spec and its current status, does its
work through the queue layer (``analysisq.queue``) and the Kubernetes API (``kubeapi``), and
returns a ``Report``: the status fields to patch and the Events to post. The handlers in
``handlers`` call these and write the reports. Errors stay typed (``analysisq.errors`` plus
``kubeapi.SecretMissing`` / ``KubeApiError``); ``problem_of`` turns one into the reason and
message of the ``Degraded`` condition.

Nothing here loses an item: filling is idempotent (``runs.fill``), stopping workers releases
their claims, and a run whose database is unreachable simply waits.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import asyncpg

from analysisq.db.connect import acquire, translated
from analysisq.errors import (
    AnalysisqError,
    ConfigError,
    DatabaseError,
    DatabaseUnavailable,
    SchemaMismatch,
    SpecError,
)
from analysisq.kube.databases import DatabasePools
from analysisq.kube.deployment import (
    RESUME_ANNOTATION,
    database_ref,
    desired_replicas,
    worker_deployment,
)
from analysisq.kube.kubeapi import KubeApi, KubeApiError, SecretMissing
from analysisq.kube.metrics import Metrics
from analysisq.kube.podhealth import workers_problem
from analysisq.kube.provider_metrics import LATENCY_BOUNDS
from analysisq.kube.ref import RunRef
from analysisq.kube.retries import RETRY_ANNOTATION, last_retry, parse_retry_request, reopened
from analysisq.kube.status import (
    BUDGET_EXHAUSTED,
    DEGRADED,
    FILLED,
    FILLING,
    FINISHED,
    PAUSED,
    PAUSED_CONDITION,
    PENDING,
    RUNNING,
    SUCCEEDED,
    SUSPENDED,
    BatchView,
    Observation,
    PausedTarget,
    Problem,
    RateMeter,
    changed,
    degraded,
    get_condition,
    is_true,
    reconciled,
    set_condition,
    summary,
    timestamp,
)
from analysisq.queue import batches, budget, rescue, retries, runs, usage
from analysisq.queue.dashboard import provider_calls
from analysisq.settings import Settings
from analysisq.spec import AnalysisRunSpec

log = logging.getLogger("analysisq.operator")

Status = Mapping[str, Any]

#: Errors after which the operator retries; anything else is a bug and propagates.
RETRYABLE: tuple[type[AnalysisqError], ...] = (DatabaseError, SecretMissing, KubeApiError)


class NotYet(AnalysisqError):
    """A change is under way (e.g. a rollout); the handler tries again in a moment."""


def rolled_out(deployment: Mapping[str, Any] | None) -> bool:
    """Every worker pod runs the Deployment's current template (old ones are gone)."""
    if deployment is None:
        return False
    spec, status = deployment.get("spec") or {}, deployment.get("status") or {}
    want = spec.get("replicas", 1)
    return bool(
        status.get("observedGeneration", 0) >= deployment["metadata"].get("generation", 0)
        and status.get("updatedReplicas", 0) == want
        and status.get("replicas", 0) == want
    )


def old_pods_gone(deployment: Mapping[str, Any], rolled_out_at: float, now: float) -> bool:
    """After ``rolled_out``: no pod of an older template can still run.

    ``rolled_out`` counts active pods only; a deleted pod drains for up to its grace period
    with the old API key, and one late 401 from it would pause the target again. Where the
    API reports ``terminatingReplicas`` (Kubernetes 1.33+ with the
    DeploymentReplicaSetTerminatingReplicas gate) that count decides. Elsewhere (no pod
    listing: the operator may not read pods) the old pods were deleted before the rollout
    was first seen complete at *rolled_out_at*, so they are gone one grace period later."""
    status = deployment.get("status") or {}
    if status.get("terminatingReplicas") is not None:
        return int(status["terminatingReplicas"]) == 0
    pod = ((deployment.get("spec") or {}).get("template") or {}).get("spec") or {}
    grace = float(pod.get("terminationGracePeriodSeconds", 30))
    return now - rolled_out_at > grace


@dataclass(frozen=True)
class Note:
    """An Event to post on the AnalysisRun."""

    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass
class Report:
    status: dict[str, Any] = field(default_factory=dict)
    notes: list[Note] = field(default_factory=list)


def problem_of(exc: AnalysisqError) -> Problem:
    """The ``Degraded`` reason and message for an error."""
    reasons: list[tuple[type[AnalysisqError], str]] = [
        (SchemaMismatch, "SchemaMismatch"),
        (DatabaseUnavailable, "DatabaseUnavailable"),
        (DatabaseError, "DatabaseError"),
        (SecretMissing, "SecretMissing"),
        (KubeApiError, "KubernetesApiError"),
        (SpecError, "InvalidSpec"),
    ]
    for kind, reason in reasons:
        if isinstance(exc, kind):
            return Problem(reason, exc.message)
    return Problem("Error", exc.message)


def degraded_report(status: Status, problem: Problem) -> Report:
    """Status and Event for a problem; the Event only when the reason is new."""
    old = get_condition(status, DEGRADED)
    conditions = degraded(status.get("conditions") or [], [problem])
    patch: dict[str, Any] = {"conditions": conditions, "message": problem.message}
    if not status.get("phase"):
        patch["phase"] = PENDING
    fresh = old is None or old.get("status") != "True" or old.get("reason") != problem.reason
    notes = [Note("Warning", problem.reason, problem.message)] if fresh else []
    return Report(changed(status, patch), notes)


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
                    shown = ", ".join(result.missing_ids[:10])
                    more = len(result.missing_ids) - 10
                    report.notes.append(
                        Note(
                            "Warning",
                            "PromptsMissing",
                            f"{len(result.missing_ids)} selected prompt ids do not exist: "
                            f"{shown}" + (f" and {more} more" if more > 0 else ""),
                        )
                    )
            if not is_true(status, FILLED):
                counts = await runs.counts(conn, ref.run_id)
                message = f"{counts.total} items queued"
                conditions = set_condition(conditions, FILLED, True, "Filled", message)
                report.notes.append(Note("Normal", "Filled", message))
                if counts.total == 0:
                    report.notes.append(
                        Note("Warning", "NothingSelected", "the prompt selection matched nothing")
                    )
        await self._apply(ref, spec, desired_replicas(spec, finished=False), resume_token)
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
        if status.get("phase") in FINISHED or not is_true(status, FILLED):
            return Report()  # ensure() applies the right replicas once the run is filled
        replicas = desired_replicas(spec, finished=False)
        was_suspended = status.get("phase") == SUSPENDED
        if spec.suspend and not was_suspended and any(t.mode == "batch" for t in spec.targets):
            # Before the scale-down: the stopping workers cancel what is marked (its partial
            # results are ingested on resume).
            pool = await self._pool(ref, spec)
            async with acquire(pool) as conn:
                await batches.cancel_open(conn, ref.run_id, "suspend")
        await self._apply(ref, spec, replicas, resume_token)
        if spec.suspend and not was_suspended:
            note = Note("Normal", "Suspended", "workers scaled to 0; the queue is kept")
        elif was_suspended and not spec.suspend:
            note = Note("Normal", "Resumed", f"workers scaled to {replicas}")
        else:
            note = Note("Normal", "Scaled", f"workers scaled to {replicas}")
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
        if status.get("phase") in FINISHED or not is_true(status, FILLED):
            return Report()
        pool = await self._pool(ref, spec)
        async with acquire(pool) as conn:
            await runs.create_run(conn, ref.run_id, spec, name=ref.display_name)
        await self._apply(ref, spec, desired_replicas(spec, finished=False), resume_token)
        return Report({"observedGeneration": ref.generation})

    async def resume_targets(
        self, ref: RunRef, spec: AnalysisRunSpec, status: Status, resume_token: str | None
    ) -> Report:
        """The resume annotation changed: restart the workers (they read API keys at start),
        then resume the paused targets. In that order, and only once the old pods finished
        terminating, so that no worker still holding the old key can pause a target again."""
        if status.get("phase") in FINISHED or not is_true(status, FILLED):
            return Report()
        await self._apply(ref, spec, desired_replicas(spec, finished=False), resume_token)
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
        self, ref: RunRef, spec: AnalysisRunSpec, status: Status, resume_token: str | None,
        *, value: str,
    ) -> Report:  # fmt: skip
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
                conn, ref.run_id, error_class=request.error_class, target=request.target,
                error=request.error,
            )  # fmt: skip
        patch: dict[str, Any] = {"lastRetry": last_retry(request, count)}
        message = f"put {count} failed items back in the queue ({request.describe()})"
        if count and status.get("phase") in FINISHED:
            replicas = desired_replicas(spec, finished=False)
            await self._apply(ref, spec, replicas, resume_token)
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
        except RETRYABLE as exc:
            problems.append(problem_of(exc))
        try:
            pool = await self._pool(ref, spec)
            async with acquire(pool) as conn:
                counts = await runs.counts(conn, ref.run_id)
                spent = await usage.run_usage(conn, ref.run_id)
                run_budget = await budget.state(conn, ref.run_id)
                states = await runs.targets(conn, ref.run_id)
                if self.metrics.providers.due(ref):
                    calls = await provider_calls(conn, ref.run_id, LATENCY_BOUNDS)
                    self.metrics.providers.observe_calls(ref, calls)
                paused = [
                    PausedTarget(t.target, t.pause_reason or "", t.paused_at, t.fault is not None)
                    for t in states
                    if t.paused_at is not None
                ]
                batch_view = None
                if any(t.mode == "batch" for t in spec.targets):
                    batch_view = BatchView(
                        await batches.summary(conn, ref.run_id),
                        await batches.open_batches(conn, ref.run_id),
                    )
            self.metrics.providers.observe_paused(
                ref, {t.target: t.paused_at is not None for t in states}
            )
            deployment = await self.kube.read_deployment(ref.namespace, ref.deployment_name)
        except RETRYABLE as exc:
            problem = problem_of(exc)
            self.metrics.reconcile_errors.labels(problem.reason).inc()
            return degraded_report(status, problem)

        meter = self._meters.setdefault(ref.uid, RateMeter())
        rate = meter.add(counts.terminal)
        finishing = counts.done and status.get("phase") not in FINISHED
        desired = desired_replicas(spec, finished=counts.done)
        notes: list[Note] = []
        if deployment is None and desired > 0:
            await self._apply(ref, spec, desired, resume_token)
            notes.append(Note("Warning", "WorkersRecreated", "the worker Deployment was missing"))
            ready = 0
        else:
            ready = int(((deployment or {}).get("status") or {}).get("readyReplicas") or 0)
            current = ((deployment or {}).get("spec") or {}).get("replicas")
            if deployment is not None and current != desired:
                await self.kube.scale_deployment(ref.namespace, ref.deployment_name, desired)
        if desired > ready:
            problems += await self._workers_problem(ref)
        seen = Observation(
            counts=counts,
            desired=desired,
            ready=min(ready, desired),
            paused=paused,
            throughput=rate,
            problems=problems,
            usage=spent,
            budget=run_budget,
            batches=batch_view,
        )
        new = reconciled(status, spec, seen)
        notes += _transition_notes(status, new, paused)
        if finishing:
            async with acquire(pool) as conn:
                await runs.mark_finished(conn, ref.run_id)
            kind: Literal["Normal", "Warning"] = (
                "Normal" if new["phase"] == SUCCEEDED else "Warning"
            )
            notes.append(Note(kind, new["phase"], summary(counts)))
            self._meters.pop(ref.uid, None)
        deadline = spec.deadline.timestamp() if spec.deadline else None
        self.metrics.observe(ref, {**status, **new}, deadline)
        self.metrics.reconcile_seconds.observe(time.monotonic() - began)
        return Report(changed(status, new), notes)

    async def _workers_problem(self, ref: RunRef) -> list[Problem]:
        """Why workers are not ready, when their pods say (a bad image, a crash loop)."""
        try:
            pods = await self.kube.list_pods(ref.namespace, ref.selector())
        except KubeApiError as exc:
            return [problem_of(exc)]
        problem = workers_problem(pods)
        return [problem] if problem else []

    async def reset_stuck(self, ref: RunRef, spec: AnalysisRunSpec, status: Status) -> Report:
        """The seed's hourly cleanup, per run: requeue items whose lease expired."""
        if not is_true(status, FILLED):
            return Report()
        pool = await self._pool(ref, spec)
        async with acquire(pool) as conn:
            result = await rescue.cleanup_stuck(conn, ref.run_id, spec.stuck_after_seconds)
        if result.reset:
            self.metrics.stuck_reset.labels(ref.namespace, ref.name).inc(result.reset)
        report = Report(
            {
                "lastStuckReset": {
                    "time": timestamp(),
                    "count": result.reset,
                    "poisoned": result.poisoned,
                }
            }
        )
        if result.reset or result.poisoned:
            report.notes.append(
                Note(
                    "Warning",
                    "StuckItemsReset",
                    f"reset {result.reset} stuck items; {result.poisoned} failed for good "
                    "after losing their lease too often",
                )
            )
        return report

    # --- deletion --------------------------------------------------------------------------

    async def delete_rows(self, ref: RunRef, spec: AnalysisRunSpec) -> None:
        """``onDelete: Delete``: stop the workers, then remove the run's rows and results."""
        await self.kube.scale_deployment(ref.namespace, ref.deployment_name, 0)
        pool = await self._pool(ref, spec)
        async with acquire(pool) as conn:
            await runs.delete_run(conn, ref.run_id)
        log.info("run rows deleted", extra={"run": ref.run_id})

    async def database_health(self) -> str:
        """For the liveness endpoint: reported, never raised (a database outage must not
        get the operator restarted; runs wait for the database instead)."""
        url = self.settings.database_url
        if not url:
            return "not configured"
        try:
            async with asyncio.timeout(5):
                pool = await self.pools.get(url)
                async with acquire(pool) as conn:
                    with translated("health check"):
                        await conn.fetchval("SELECT 1")
        except TimeoutError:
            return "unavailable: no answer within 5 s"
        except DatabaseError as exc:
            return f"unavailable: {exc.message}"
        return "ok"

    def forget(self, ref: RunRef) -> None:
        self._meters.pop(ref.uid, None)
        for key in [k for k in self._rolled_out_at if k[0] == ref.uid]:
            del self._rolled_out_at[key]
        self.metrics.forget(ref)


def _transition_notes(
    old: Status, new: Mapping[str, Any], paused: list[PausedTarget]
) -> list[Note]:
    """Events for what just became true: a paused target, a new degraded reason."""
    notes: list[Note] = []
    before = {t.get("name") for t in old.get("pausedTargets") or []}
    for target in paused:
        if target.name not in before:
            fix = "the setting named" if target.by_fault else "its API key"
            notes.append(
                Note(
                    "Warning",
                    "TargetPaused",
                    f"target {target.name} paused for the run: {target.reason}; fix {fix} and "
                    f"set the annotation {RESUME_ANNOTATION} to resume it",
                )
            )
    if new.get("phase") == PAUSED and old.get("phase") != PAUSED:
        cond = get_condition(new, PAUSED_CONDITION) or {}
        notes.append(Note("Warning", BUDGET_EXHAUSTED, str(cond.get("message", ""))))
    was = get_condition(old, DEGRADED)
    now = get_condition(new, DEGRADED)
    fresh = not was or was.get("status") != "True" or was.get("reason") != (now or {}).get("reason")
    if now and now["status"] == "True" and now["reason"] != "TargetPaused" and fresh:
        notes.append(Note("Warning", now["reason"], now["message"]))
    return notes

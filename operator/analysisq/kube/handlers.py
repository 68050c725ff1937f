"""The kopf handlers, registered on an explicit registry: thin on purpose.

Each one turns the body into a ``RunRef`` and the shared ``AnalysisRunSpec``, calls one
``RunService`` method, and writes the ``Report``: status fields into kopf's patch (kopf sends
them to the status subresource) and Events on the AnalysisRun. Errors become conditions:
a retryable one (database, Secret, Kubernetes API) sets ``Degraded`` and raises
``kopf.TemporaryError`` with an exponential delay; an invalid spec is permanent.

- create / resume → ``ensure``; ``spec.workers`` / ``spec.suspend`` → ``rescale``;
  other spec fields → ``reconfigure``; the ``analysisq.io/resume-targets`` annotation →
  ``resume_targets``; the ``analysisq.io/retry-failed`` annotation → ``retry_failed``, which
  then removes it;
- timers on active runs only (a finished run matches no timer): ``reconcile`` every
  ``reconcile_seconds``, ``reset-stuck`` every ``stuck_reset_seconds``;
- delete: ``delete-rows`` for ``onDelete: Delete`` and ``cancel-batches`` for the other
  runs with ``mode: batch`` targets (so only those runs carry a finalizer; the Deployment
  goes by garbage collection) first close the run's open provider batches
  (``kube.batch_cancel``: cancelled, partial results ingested), ``forget`` for all.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import Any, NoReturn

import kopf

from analysisq.errors import AnalysisqError, ConfigError, NotYet, SecretMissing, SpecError
from analysisq.kube.batch_cancel import describe, pass_seconds
from analysisq.kube.deployment import RESUME_ANNOTATION, SCALE_FIELDS
from analysisq.kube.ref import GROUP, PLURAL, VERSION, RunRef
from analysisq.kube.report import Report, degraded_report, problem_of
from analysisq.kube.retries import RETRY_ANNOTATION
from analysisq.kube.service import RunService
from analysisq.kube.status import FINISHED
from analysisq.queue.batches import OpenBatch
from analysisq.settings import Settings
from analysisq.spec import AnalysisRunSpec, parse_spec

log = logging.getLogger("analysisq.operator")

Method = Callable[[RunRef, AnalysisRunSpec, Mapping[str, Any], str | None], Awaitable[Report]]

#: How long a deleted run waits for its provider batches to be cancelled and ingested.
BATCH_CANCEL_LIMIT = timedelta(hours=1)
BATCHES_LEFT_OPEN = "BatchesLeftOpen"


def backoff(retry: int) -> float:
    """Seconds before retry number *retry*: 2, 4, 8, ... up to a minute."""
    return float(min(2 ** (retry + 1), 60))


def _active(status: Mapping[str, Any], **_: Any) -> bool:
    return (status or {}).get("phase") not in FINISHED


def _deletes_rows(spec: Mapping[str, Any], **_: Any) -> bool:
    return (spec or {}).get("onDelete") == "Delete"


def _keeps_rows_with_batches(spec: Mapping[str, Any], **_: Any) -> bool:
    targets = (spec or {}).get("targets") or []
    return not _deletes_rows(spec) and any(
        isinstance(t, Mapping) and t.get("mode") == "batch" for t in targets
    )


@dataclass(frozen=True)
class DeletionStep:
    """One finalizer step of a deleted run: the service call, what it does (for messages),
    the Event it gives up with, and what stays while batches are open."""

    call: Callable[[RunRef, AnalysisRunSpec], Awaitable[list[OpenBatch]]]
    does: str
    gave_up: str
    kept: str


async def _delete_step(body: kopf.Body, retry: int, runtime: timedelta, step: DeletionStep) -> None:
    """Run *step*; while the run's provider batches are still open, come back later."""
    ref = RunRef.from_body(body)
    try:
        spec = _spec(body)
        still_open = await step.call(ref, spec)
    except SpecError as exc:
        raise kopf.PermanentError(exc.message) from None
    except AnalysisqError as exc:
        what = f"cannot {step.does} of {ref.run_id} yet"
        _retry_or_give_up(body, exc, retry, what, step.gave_up)
    if still_open:
        _wait_for_batches(body, ref, spec, still_open, retry, runtime, f"{step.kept} is kept")


def _retry_or_give_up(
    body: kopf.Body, exc: AnalysisqError, retry: int, what: str, gave_up: str
) -> NoReturn:
    """A deletion step failed: retry later, or give up with the *gave_up* Event when it
    cannot succeed (a Secret gone with the run, a key the operator cannot use) or failed
    ten times."""
    if not exc.retryable and not isinstance(exc, ConfigError):
        raise exc
    problem = problem_of(exc)
    message = f"{what}: {problem.message}"
    if not exc.retryable or isinstance(exc, SecretMissing) or retry >= 10:
        kopf.event(body, type="Warning", reason=gave_up, message=message)
        raise kopf.PermanentError(message) from None
    kopf.event(body, type="Warning", reason=problem.reason, message=message)
    raise kopf.TemporaryError(message, delay=backoff(retry)) from None


def _wait_for_batches(
    body: kopf.Body,
    ref: RunRef,
    spec: AnalysisRunSpec,
    still_open: list[OpenBatch],
    retry: int,
    runtime: timedelta,
    kept: str,
) -> NoReturn:
    """Batches are being cancelled: come back for the next pass; after ``BATCH_CANCEL_LIMIT``
    give up with an Event that names them (their rows stay in the database)."""
    what = describe(still_open)
    if runtime > BATCH_CANCEL_LIMIT:
        message = (
            f"{what} of {ref.run_id} still open after {runtime}: {kept}; cancel them at the "
            "provider by hand"
        )
        kopf.event(body, type="Warning", reason=BATCHES_LEFT_OPEN, message=message)
        raise kopf.PermanentError(message)
    message = f"cancelling {what} and ingesting their partial results; {kept} until they end"
    if retry == 0:
        kopf.event(body, type="Normal", reason="CancellingBatches", message=message)
    raise kopf.TemporaryError(message, delay=pass_seconds(spec))


def _resume_token(body: Mapping[str, Any]) -> str | None:
    annotations = body.get("metadata", {}).get("annotations") or {}
    token = annotations.get(RESUME_ANNOTATION)
    return str(token) if token else None


def _spec(body: Mapping[str, Any]) -> AnalysisRunSpec:
    return parse_spec(_plain(body.get("spec") or {}), source="spec")


def _plain(value: Any) -> Any:
    """kopf's mapping views as plain dicts, for pydantic."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _status(body: Mapping[str, Any]) -> dict[str, Any]:
    return dict(_plain(body.get("status") or {}))


def write(body: kopf.Body, patch: kopf.Patch, report: Report) -> None:
    """Put the report's status fields into kopf's patch and post its Events."""
    for key, value in report.status.items():
        patch.status[key] = value
    for note in report.notes:
        kopf.event(body, type=note.type, reason=note.reason, message=note.message)
        level = logging.INFO if note.type == "Normal" else logging.WARNING
        log.log(
            level,
            note.message,
            extra={"reason": note.reason, "object": RunRef.from_body(body).display_name},
        )


async def _handle(body: kopf.Body, patch: kopf.Patch, retry: int, method: Method) -> None:
    ref = RunRef.from_body(body)
    status = _status(body)
    try:
        spec = _spec(body)
        report = await method(ref, spec, status, _resume_token(body))
    except SpecError as exc:
        write(body, patch, degraded_report(status, problem_of(exc)))
        raise kopf.PermanentError(exc.message) from None
    except NotYet as exc:
        raise kopf.TemporaryError(exc.message, delay=2) from None
    except AnalysisqError as exc:
        if not exc.retryable:
            raise
        write(body, patch, degraded_report(status, problem_of(exc)))
        raise kopf.TemporaryError(exc.message, delay=backoff(retry)) from None
    write(body, patch, report)


def register(registry: kopf.OperatorRegistry, service: RunService, settings: Settings) -> None:
    """Register every handler of the operator on *registry*."""
    on: dict[str, Any] = {"group": GROUP, "version": VERSION, "plural": PLURAL}

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        return kopf.login_via_client(**kwargs)

    @kopf.on.resume(**on, id="ensure", registry=registry)
    @kopf.on.create(**on, id="ensure", registry=registry)
    async def ensure(body: kopf.Body, patch: kopf.Patch, retry: int, **_: Any) -> None:
        await _handle(body, patch, retry, service.ensure)

    @kopf.on.field(**on, id="rescale-workers", field="spec.workers", registry=registry)
    @kopf.on.field(**on, id="rescale-suspend", field="spec.suspend", registry=registry)
    async def rescale(body: kopf.Body, patch: kopf.Patch, retry: int, old: Any, **_: Any) -> None:
        if old is None:
            return  # creation: ensure() starts the workers at the right scale
        await _handle(body, patch, retry, service.rescale)

    @kopf.on.update(**on, id="reconfigure", field="spec", registry=registry)
    async def reconfigure(
        body: kopf.Body, patch: kopf.Patch, retry: int, diff: kopf.Diff, **_: Any
    ) -> None:
        if _changed_fields(diff) <= SCALE_FIELDS:
            return
        await _handle(body, patch, retry, service.reconfigure)

    @kopf.on.field(
        **on,
        id="resume-targets",
        field=("metadata", "annotations", RESUME_ANNOTATION),
        registry=registry,
    )
    async def resume_targets(body: kopf.Body, patch: kopf.Patch, retry: int, **_: Any) -> None:
        await _handle(body, patch, retry, service.resume_targets)

    @kopf.on.field(
        **on,
        id="retry-failed",
        field=("metadata", "annotations", RETRY_ANNOTATION),
        registry=registry,
    )
    async def retry_failed(
        body: kopf.Body, patch: kopf.Patch, retry: int, new: Any, **_: Any
    ) -> None:
        if new is None:
            return  # removed (by us, once done)
        await _handle(body, patch, retry, partial(service.retry_failed, value=str(new)))
        patch.metadata.annotations[RETRY_ANNOTATION] = None

    # backoff: a tick that raised comes back at the next interval, not after kopf's default
    # 60 s (which froze the status for a minute after one unexpected error).
    @kopf.timer(
        **on,
        id="reconcile",
        interval=settings.reconcile_seconds,
        backoff=settings.reconcile_seconds,
        when=_active,
        registry=registry,
    )
    async def reconcile(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
        try:
            spec = _spec(body)
        except SpecError:
            return  # the change handlers report it
        ref = RunRef.from_body(body)
        write(body, patch, await service.reconcile(ref, spec, _status(body), _resume_token(body)))

    @kopf.timer(
        **on,
        id="reset-stuck",
        interval=settings.stuck_reset_seconds,
        backoff=settings.stuck_reset_seconds,
        when=_active,
        registry=registry,
    )
    async def rescue_stuck(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
        ref = RunRef.from_body(body)
        try:
            report = await service.rescue_stuck(ref, _spec(body), _status(body))
        except SpecError:
            return
        except AnalysisqError as exc:
            if not exc.retryable:
                raise
            # The reconcile timer reports the condition; this one tries again next interval.
            problem = problem_of(exc)
            service.metrics.reconcile_errors.labels(problem.reason).inc()
            log.warning(
                "stuck reset skipped",
                extra={"run": ref.run_id, "reason": problem.reason, "error": problem.message},
            )
            return
        write(body, patch, report)

    @kopf.on.delete(**on, id="delete-rows", when=_deletes_rows, registry=registry)
    async def delete_rows(body: kopf.Body, retry: int, runtime: timedelta, **_: Any) -> None:
        step = DeletionStep(service.delete_rows, "delete the queue rows", "RowsKept", "its rows")
        await _delete_step(body, retry, runtime, step)

    @kopf.on.delete(**on, id="cancel-batches", when=_keeps_rows_with_batches, registry=registry)
    async def cancel_batches(body: kopf.Body, retry: int, runtime: timedelta, **_: Any) -> None:
        step = DeletionStep(
            service.close_batches, "cancel the provider batches", BATCHES_LEFT_OPEN, "the run"
        )
        await _delete_step(body, retry, runtime, step)

    @kopf.on.delete(**on, id="forget", optional=True, registry=registry)
    def forget(body: kopf.Body, **_: Any) -> None:
        service.forget(RunRef.from_body(body))

    @kopf.on.probe(id="database", registry=registry)
    async def database(**_: Any) -> str:
        return await service.database_health()


def _changed_fields(diff: kopf.Diff) -> set[str]:
    """Top-level spec fields a diff touches ("*" when the whole spec changed)."""
    fields: set[str] = set()
    for item in diff:
        path = tuple(item[1])
        if path[:1] == ("spec",):
            path = path[1:]
        fields.add(str(path[0]) if path else "*")
    return fields

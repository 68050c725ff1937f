"""Why a run's worker pods do not become ready, from their status (pure functions).

A Deployment only says "0 of 3 ready"; the kubelet writes the cause on each pod: an image
that cannot be pulled (``ErrImagePull``, ``ImagePullBackOff``), a container that cannot
start or keeps dying (``RunContainerError``, ``CrashLoopBackOff``), an env var whose Secret
is missing (``CreateContainerConfigError``), a pod no node can take (``Unschedulable``). The
service turns the first such cause into the run's ``Degraded`` condition (reason
``WorkersFailing``) and an Event, so a broken install is visible on the AnalysisRun instead of
a silent stall. Messages come from the kubelet and scheduler; they name images and Secrets,
never Secret values.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from analysisq.kube.status import Problem

WORKERS_FAILING = "WorkersFailing"

#: Container waiting reasons that will not clear by themselves.
FAILING_WAITING = frozenset(
    {
        "ErrImagePull",
        "ImagePullBackOff",
        "ErrImageNeverPull",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
        "CrashLoopBackOff",
    }
)

_MAX_MESSAGE = 300


def _container_problem(pod: str, status: Mapping[str, Any]) -> str | None:
    waiting = (status.get("state") or {}).get("waiting") or {}
    reason = waiting.get("reason")
    if reason not in FAILING_WAITING:
        return None
    detail = str(waiting.get("message") or "").strip()
    last = (status.get("lastState") or {}).get("terminated") or {}
    # A crash loop's own message only says "back-off ... restarting failed container": the
    # cause is in how the container last ended (a runtime error that kept it from starting,
    # or its exit code).
    if last and (reason == "CrashLoopBackOff" or not detail):
        detail = f"last exit code {last.get('exitCode')} ({last.get('reason') or 'terminated'})"
        if last.get("message"):
            detail += f": {str(last['message']).strip()}"
    restarts = int(status.get("restartCount") or 0)
    text = f"worker pod {pod}: {reason}"
    if detail:
        text += f": {detail[:_MAX_MESSAGE]}"
    if restarts:
        text += f" (restarted {restarts} times)"
    return text


def _unschedulable(pod: str, conditions: Iterable[Mapping[str, Any]]) -> str | None:
    for condition in conditions:
        if (
            condition.get("type") == "PodScheduled"
            and condition.get("status") == "False"
            and condition.get("reason") == "Unschedulable"
        ):
            message = str(condition.get("message") or "").strip()[:_MAX_MESSAGE]
            return f"worker pod {pod}: Unschedulable: {message}"
    return None


def workers_problem(pods: Iterable[Mapping[str, Any]]) -> Problem | None:
    """The first cause that keeps a worker pod from running, or None."""
    found: list[str] = []
    for pod in pods:
        name = str((pod.get("metadata") or {}).get("name") or "?")
        status = pod.get("status") or {}
        containers = list(status.get("initContainerStatuses") or []) + list(
            status.get("containerStatuses") or []
        )
        for container in containers:
            text = _container_problem(name, container)
            if text:
                found.append(text)
        text = _unschedulable(name, status.get("conditions") or [])
        if text:
            found.append(text)
    if not found:
        return None
    found.sort()
    message = found[0]
    if len(found) > 1:
        message += f"; and {len(found) - 1} more"
    return Problem(WORKERS_FAILING, message)

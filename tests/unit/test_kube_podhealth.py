"""Why worker pods are not ready, read from pod status as the kubelet writes it."""

from __future__ import annotations

from typing import Any

import pytest

from analysisq.kube.podhealth import WORKERS_FAILING, workers_problem

pytestmark = pytest.mark.unit


def _pod(name: str, **status: Any) -> dict[str, Any]:
    return {"metadata": {"name": name}, "status": status}


def _waiting(reason: str, message: str = "", restarts: int = 0, **extra: Any) -> dict[str, Any]:
    return {
        "name": "worker",
        "ready": False,
        "restartCount": restarts,
        "state": {"waiting": {"reason": reason, "message": message}},
        **extra,
    }


def test_running_and_starting_pods_are_no_problem() -> None:
    running = _pod("w-1", containerStatuses=[{"name": "worker", "state": {"running": {}}}])
    creating = _pod("w-2", containerStatuses=[_waiting("ContainerCreating")])
    pending = _pod("w-3", phase="Pending")
    assert workers_problem([running, creating, pending]) is None


def test_an_image_that_cannot_be_pulled_names_the_pod_and_the_image() -> None:
    message = 'Back-off pulling image "localhost/analysisq-missing:0"'
    problem = workers_problem(
        [_pod("w-1", containerStatuses=[_waiting("ImagePullBackOff", message)])]
    )
    assert problem is not None
    assert problem.reason == WORKERS_FAILING
    assert problem.message == f"worker pod w-1: ImagePullBackOff: {message}"


def test_a_crash_loop_without_message_reports_the_last_exit() -> None:
    status = _waiting(
        "CrashLoopBackOff",
        restarts=4,
        lastState={"terminated": {"exitCode": 2, "reason": "Error"}},
    )
    problem = workers_problem([_pod("w-1", containerStatuses=[status])])
    assert problem is not None
    assert problem.message == (
        "worker pod w-1: CrashLoopBackOff: last exit code 2 (Error) (restarted 4 times)"
    )


def test_a_crash_loop_names_why_the_container_last_ended() -> None:
    # What the kubelet wrote on the real node for an image without `analysisq` in it.
    error = (
        "failed to create containerd task: failed to create shim task: OCI runtime create "
        'failed: runc create failed: unable to start container process: exec: "analysisq": '
        "executable file not found in $PATH: unknown"
    )
    status = _waiting(
        "CrashLoopBackOff",
        "back-off 20s restarting failed container=worker pod=w-1_ns(0f1e)",
        restarts=2,
        lastState={"terminated": {"exitCode": 128, "reason": "StartError", "message": error}},
    )
    problem = workers_problem([_pod("w-1", containerStatuses=[status])])
    assert problem is not None
    assert problem.message == (
        f"worker pod w-1: CrashLoopBackOff: last exit code 128 (StartError): {error}"
        " (restarted 2 times)"
    )


def test_a_missing_secret_and_an_unschedulable_pod_are_both_counted() -> None:
    secret = _pod(
        "w-b",
        containerStatuses=[_waiting("CreateContainerConfigError", 'secret "db" not found')],
    )
    unschedulable = _pod(
        "w-a",
        conditions=[
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
             "message": "0/1 nodes are available: 1 Insufficient memory."}
        ],
    )  # fmt: skip
    problem = workers_problem([secret, unschedulable])
    assert problem is not None
    assert problem.message == (
        "worker pod w-a: Unschedulable: 0/1 nodes are available: 1 Insufficient memory.; and 1 more"
    )


def test_long_kubelet_messages_are_cut() -> None:
    problem = workers_problem([_pod("w", containerStatuses=[_waiting("ErrImagePull", "x" * 5000)])])
    assert problem is not None
    assert len(problem.message) < 400

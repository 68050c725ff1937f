"""What the worker Deployment's status says: replicas ready, rollout done, old pods gone.

Pure functions over the Deployment as the API returns it (``KubeApi.read_deployment``); the
service decides what to do with the answers (``kube.service``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def ready_replicas(deployment: Mapping[str, Any] | None) -> int:
    """Worker pods ready now (0 without a Deployment)."""
    return int(((deployment or {}).get("status") or {}).get("readyReplicas") or 0)


def spec_replicas(deployment: Mapping[str, Any] | None) -> int | None:
    """The replicas the Deployment asks for, None without one (or without the field)."""
    value = ((deployment or {}).get("spec") or {}).get("replicas")
    return None if value is None else int(value)


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

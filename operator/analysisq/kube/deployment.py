"""The worker Deployment of a run, as a manifest (a plain dict) for server-side apply.

One container running ``analysisq worker --run <run id>`` from the operator's image. Secrets
are referenced, never copied: ``DATABASE_URL`` and each target's API key come from
``secretKeyRef``. The pod runs under the restricted Pod Security profile (non-root, read-only
root filesystem, no capabilities, RuntimeDefault seccomp) and gets a termination grace period
longer than the worker's own shutdown grace, so a worker told to stop releases its claims
before it is killed. A hash of the spec fields the worker reads is a template annotation:
changing them rolls the pods, changing ``workers`` or ``suspend`` only scales.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from analysisq.kube.ref import RunRef
from analysisq.providers import api_key_variable
from analysisq.settings import Settings
from analysisq.spec import AnalysisRunSpec, SecretKeyRef

FIELD_MANAGER = "analysisq-operator"
CONTAINER = "worker"
CONFIG_HASH = "analysisq.io/config-hash"
RESUME_ANNOTATION = "analysisq.io/resume-targets"

#: Used when the spec has no ``resources``: what a worker doing HTTP calls needs.
DEFAULT_RESOURCES: dict[str, dict[str, str]] = {
    "requests": {"cpu": "100m", "memory": "128Mi"},
    "limits": {"memory": "256Mi"},
}

#: Spec fields whose change only scales the workers (the ``rescale`` handler), nothing else.
SCALE_FIELDS = frozenset({"workers", "suspend"})
#: Spec fields that do not change what a worker process does: no restart when they change.
#: (targetFaultThreshold is read by the database, from run_targets, at each target fault.)
NOT_FOR_WORKERS = SCALE_FIELDS | {
    "deadline",
    "onDelete",
    "maxFailedRatio",
    "resources",
    "targetFaultThreshold",
}


def desired_replicas(spec: AnalysisRunSpec, *, finished: bool) -> int:
    """Workers wanted now: none once finished or while suspended, else ``spec.workers``."""
    if finished or spec.suspend:
        return 0
    return spec.workers


def database_ref(spec: AnalysisRunSpec, settings: Settings) -> SecretKeyRef:
    """The Secret key holding the run's database URL (the operator's default if unset)."""
    return spec.database_secret_ref or SecretKeyRef(
        name=settings.database_secret_name, key=settings.database_secret_key
    )


def secret_refs(spec: AnalysisRunSpec, settings: Settings) -> list[SecretKeyRef]:
    """Every Secret key the worker pods need, the database first."""
    refs = [database_ref(spec, settings)]
    refs += [t.api_key_secret_ref for t in spec.targets if t.api_key_secret_ref]
    return refs


def config_hash(spec: AnalysisRunSpec) -> str:
    data = {k: v for k, v in spec.to_json().items() if k not in NOT_FOR_WORKERS}
    if "budget" in data:
        # Workers read the amounts from the database at each reservation: raising a budget
        # must not restart them; only having one or not changes what they do.
        data["budget"] = True
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _env(spec: AnalysisRunSpec, settings: Settings) -> list[dict[str, Any]]:
    db = database_ref(spec, settings)
    env: list[dict[str, Any]] = [
        {"name": "DATABASE_URL", "valueFrom": {"secretKeyRef": {"name": db.name, "key": db.key}}},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "ANALYSISQ_LOG_FORMAT", "value": "json"},
        {"name": "ANALYSISQ_LOG_LEVEL", "value": settings.log_level},
        # Workers reach the database the operator does, through the same pooler (if any).
        {"name": "ANALYSISQ_DATABASE_POOLER", "value": settings.database_pooler},
        # Leave the worker time to release what it holds before the kubelet's SIGKILL.
        {
            "name": "ANALYSISQ_SHUTDOWN_GRACE_SECONDS",
            "value": str(max(1, settings.worker_grace_seconds * 2 // 3)),
        },
    ]
    for target in spec.targets:
        ref = target.api_key_secret_ref
        if ref is None:
            continue
        name = api_key_variable(target)
        env.append(
            {"name": name, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}
        )
    return env


def _resources(spec: AnalysisRunSpec) -> dict[str, Any]:
    if spec.resources is None:
        return DEFAULT_RESOURCES
    out: dict[str, Any] = {}
    if spec.resources.requests:
        out["requests"] = dict(spec.resources.requests)
    if spec.resources.limits:
        out["limits"] = dict(spec.resources.limits)
    return out


def worker_deployment(
    ref: RunRef,
    spec: AnalysisRunSpec,
    settings: Settings,
    *,
    replicas: int,
    resume_token: str | None = None,
) -> dict[str, Any]:
    """The full desired Deployment; apply it with field manager ``FIELD_MANAGER``.

    ``resume_token`` is the run's ``analysisq.io/resume-targets`` annotation: copying it into
    the pod template restarts the workers when it changes (they read API keys at start).
    """
    labels = ref.worker_labels()
    annotations = {CONFIG_HASH: config_hash(spec)}
    if resume_token:
        annotations[RESUME_ANNOTATION] = resume_token
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": settings.worker_grace_seconds,
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [
            {
                "name": CONTAINER,
                "image": settings.worker_image,
                "imagePullPolicy": "IfNotPresent",
                "command": ["analysisq", "worker", "--run", ref.run_id],
                "env": _env(spec, settings),
                "resources": _resources(spec),
                "securityContext": {
                    "allowPrivilegeEscalation": False,
                    "readOnlyRootFilesystem": True,
                    "runAsNonRoot": True,
                    "capabilities": {"drop": ["ALL"]},
                },
                "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
            }
        ],
        "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}],
    }
    if settings.worker_service_account:
        pod_spec["serviceAccountName"] = settings.worker_service_account
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": ref.deployment_name,
            "namespace": ref.namespace,
            "labels": labels,
            "ownerReferences": [ref.owner_reference()],
        },
        "spec": {
            "replicas": replicas,
            "revisionHistoryLimit": 2,
            "selector": {"matchLabels": ref.selector()},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"},
            },
            "template": {
                "metadata": {"labels": labels, "annotations": annotations},
                "spec": pod_spec,
            },
        },
    }

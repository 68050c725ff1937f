"""Helpers the chart, trigger and RBAC tests share on the real control plane.

They take the ``kubectl`` fixture of ``controlplane.fixtures`` (a callable running the built
kubectl with the admin kubeconfig) and work on rendered YAML streams.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from controlplane.fixtures import Kubectl, eventually
from tools.helm import ROOT

CRD = ROOT / "crds" / "analysisrun.yaml"

# Stand-ins for the prometheus-operator CRDs, so ServiceMonitor and PrometheusRule objects can
# be applied; their own schemas are not ours to test.
_MONITORING_CRDS = [
    ("servicemonitors", "ServiceMonitor"),
    ("prometheusrules", "PrometheusRule"),
]

_lock = threading.Lock()
_applied: set[str] = set()


def _once(key: str, kubectl: Kubectl, apply: str) -> None:
    with _lock:
        if key in _applied:
            return
        kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=apply)

        def established() -> None:
            out = kubectl("get", "crd", "-o", "json").stdout
            ready = {
                item["metadata"]["name"]
                for item in json.loads(out)["items"]
                if any(
                    c["type"] == "Established" and c["status"] == "True"
                    for c in item.get("status", {}).get("conditions", [])
                )
            }
            wanted = {doc["metadata"]["name"] for doc in _docs(apply)}
            assert wanted <= ready, f"CRDs not established yet: {wanted - ready}"

        eventually(established, timeout=30)
        _applied.add(key)


def _docs(stream: str) -> list[dict[str, Any]]:
    import yaml

    return [d for d in yaml.safe_load_all(stream) if d]


def apply_analysisrun_crd(kubectl: Kubectl) -> None:
    """The repository's CRD, applied (server-side, as docs/install.md says) and established."""
    _once("analysisrun", kubectl, CRD.read_text())


def apply_monitoring_crds(kubectl: Kubectl) -> None:
    docs = []
    for plural, kind in _MONITORING_CRDS:
        docs.append(
            {
                "apiVersion": "apiextensions.k8s.io/v1",
                "kind": "CustomResourceDefinition",
                "metadata": {"name": f"{plural}.monitoring.coreos.com"},
                "spec": {
                    "group": "monitoring.coreos.com",
                    "scope": "Namespaced",
                    "names": {"plural": plural, "kind": kind, "singular": kind.lower()},
                    "versions": [
                        {
                            "name": "v1",
                            "served": True,
                            "storage": True,
                            "schema": {
                                "openAPIV3Schema": {
                                    "type": "object",
                                    "x-kubernetes-preserve-unknown-fields": True,
                                }
                            },
                        }
                    ],
                },
            }
        )
    _once("monitoring", kubectl, "\n---\n".join(json.dumps(d) for d in docs))


def create_namespace(kubectl: Kubectl, name: str, *, restricted: bool = True) -> None:
    """A namespace (idempotent); ``restricted`` enforces the restricted Pod Security level.

    A namespace of the same name still terminating (an earlier test deleted it without
    waiting) is waited out first: applying over it would succeed and then vanish.
    """
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        phase = kubectl(
            "get", "namespace", name, "-o", "jsonpath={.status.phase}", check=False
        ).stdout.strip()
        if phase != "Terminating":
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"namespace {name} is still terminating after 120 s")
    labels = {"analysisq.io/test": "true"}
    if restricted:
        labels["pod-security.kubernetes.io/enforce"] = "restricted"
    manifest = {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "labels": labels},
    }
    kubectl("apply", "-f", "-", input=json.dumps(manifest))


def delete_namespace(kubectl: Kubectl, name: str) -> None:
    kubectl("delete", "namespace", name, "--ignore-not-found", "--wait=false")


def apply_stream(kubectl: Kubectl, stream: str) -> str:
    """Server-side dry run, then the real apply; returns kubectl's stderr (its warnings)."""
    dry = kubectl("apply", "--dry-run=server", "-f", "-", input=stream)
    real = kubectl("apply", "-f", "-", input=stream)
    return dry.stderr + real.stderr


def delete_stream(kubectl: Kubectl, stream: str) -> None:
    """Delete what a stream created, cluster-scoped objects included."""
    kubectl("delete", "--ignore-not-found", "--wait=false", "-f", "-", input=stream, check=False)


def can_i(kubectl: Kubectl, account: str, verb: str, resource: str, namespace: str | None) -> bool:
    """``kubectl auth can-i`` as ``account`` ("NAMESPACE:NAME" of a ServiceAccount).

    ``resource`` is ``type[.group][/name]``, with a subresource as a suffix in brackets:
    ``analysisruns.analysisq.io[status]`` (kubectl would read ``.../status`` as a name).
    """
    ns, name = account.split(":")
    args = ["auth", "can-i", verb]
    if resource.endswith("]"):
        resource, _, sub = resource[:-1].partition("[")
        args += [resource, f"--subresource={sub}"]
    else:
        args.append(resource)
    args.append(f"--as=system:serviceaccount:{ns}:{name}")
    result = kubectl(*args, namespace=namespace, check=False)
    answer = result.stdout.strip()
    assert answer in ("yes", "no"), f"kubectl auth can-i said {answer!r}: {result.stderr}"
    return answer == "yes"


def wait_job_complete(
    kubectl: Kubectl, namespace: str, job: str, *, pod_log: Any = None, timeout: float = 120
) -> dict[str, Any]:
    """Wait until a Job has succeeded; on failure the message includes its pods' logs."""

    def complete() -> dict[str, Any]:
        body = json.loads(kubectl("get", "job", job, "-o", "json", namespace=namespace).stdout)
        status = body.get("status", {})
        if status.get("failed"):
            raise RuntimeError(
                f"job {job} failed: {status}\n{_logs(kubectl, namespace, job, pod_log)}"
            )
        assert status.get("succeeded") == 1, f"job {job} not complete yet: {status}"
        return dict(body)

    try:
        return eventually(complete, timeout=timeout, interval=0.5)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{_logs(kubectl, namespace, job, pod_log)}") from None


def _logs(kubectl: Kubectl, namespace: str, job: str, pod_log: Any) -> str:
    if pod_log is None:
        return ""
    pods = json.loads(
        kubectl("get", "pods", "-l", f"job-name={job}", "-o", "json", namespace=namespace).stdout
    )["items"]
    out = []
    for pod in pods:
        path: Path = pod_log(namespace, pod["metadata"]["name"])
        text = path.read_text() if path.exists() else "(no log)"
        out.append(f"--- pod {pod['metadata']['name']}:\n{text[-3000:]}")
    return "\n".join(out)

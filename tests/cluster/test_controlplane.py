"""The test control plane behaves like a real cluster: CRD schemas and CEL rules, the status
subresource, watches and conflicts, Deployments and CronJobs whose pods really run as local
processes, owner garbage collection and namespace deletion."""

from __future__ import annotations

import json
import os
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from controlplane.fixtures import Kubectl, KubectlError, eventually
from controlplane.harness import ControlPlane
from controlplane.podrunner import PodRunner

pytestmark = pytest.mark.cluster

GROUP, VERSION, PLURAL = "tests.analysisq.io", "v1", "widgets"

CRD = f"""
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: {PLURAL}.{GROUP}
spec:
  group: {GROUP}
  scope: Namespaced
  names: {{plural: {PLURAL}, singular: widget, kind: Widget, shortNames: [wd]}}
  versions:
  - name: {VERSION}
    served: true
    storage: true
    subresources: {{status: {{}}}}
    additionalPrinterColumns:
    - {{name: Phase, type: string, jsonPath: .status.phase}}
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            required: [size]
            x-kubernetes-validations:
            - rule: "self.minReplicas <= self.maxReplicas"
              message: "minReplicas must not exceed maxReplicas"
            properties:
              size: {{type: integer, minimum: 1, maximum: 10}}
              mode: {{type: string, enum: [fast, careful], default: careful}}
              minReplicas: {{type: integer, default: 1}}
              maxReplicas: {{type: integer, default: 3}}
          status:
            type: object
            properties:
              phase: {{type: string}}
              observedGeneration: {{type: integer}}
"""

# A pod command: note start, exit 0 on SIGTERM after noting it. MARKERS is a host directory.
SERVER = textwrap.dedent(
    """
    import os, pathlib, signal, sys, time
    marker = pathlib.Path(os.environ["MARKERS"]) / os.environ["POD_NAME"]
    def stop(signum, frame):
        marker.with_suffix(".terminated").write_text(str(os.getpid()))
        sys.exit(0)
    signal.signal(signal.SIGTERM, stop)
    marker.with_suffix(".started").write_text(str(os.getpid()))
    while True:
        time.sleep(0.2)
    """
)


def _widget(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Widget",
        "metadata": {"name": name},
        "spec": spec,
    }


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead too; the runner reaps its children, so this is brief.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _json(kubectl: Kubectl, *args: str, namespace: str | None = None) -> Any:
    return json.loads(kubectl(*args, "-o", "json", namespace=namespace).stdout)


@pytest.fixture(scope="module")
def widget_crd(kubectl: Kubectl) -> str:
    kubectl("apply", "-f", "-", input=CRD)

    # Not `kubectl wait`: it fails outright while the new CRD has no conditions at all.
    def established() -> None:
        crd = _json(kubectl, "get", "crd", f"{PLURAL}.{GROUP}")
        conditions = {c["type"]: c["status"] for c in crd["status"].get("conditions") or []}
        assert conditions.get("Established") == "True", conditions

    eventually(established)
    return f"{PLURAL}.{GROUP}"


def test_control_plane_reports_its_version_and_starts_quickly(
    control_plane: ControlPlane, kubectl: Kubectl
) -> None:
    version = _json(kubectl, "version")
    assert version["serverVersion"]["gitVersion"] == "v1.34.3"
    assert control_plane.startup_seconds < 20
    assert set(control_plane.rss_bytes()) == {"etcd", "kube-apiserver", "kube-controller-manager"}
    assert all(rss > 0 for rss in control_plane.rss_bytes().values())


@pytest.mark.timeout(120)
def test_custom_resource_schema_cel_status_watch_and_conflicts(
    widget_crd: str, kubectl: Kubectl, kube_api: client.ApiClient, namespace: str
) -> None:
    custom = client.CustomObjectsApi(kube_api)
    kubectl("apply", "-f", "-", input=json.dumps(_widget("w1", size=2)), namespace=namespace)
    created = _json(kubectl, "get", "widget", "w1", namespace=namespace)
    assert created["spec"] == {"size": 2, "mode": "careful", "minReplicas": 1, "maxReplicas": 3}

    status = {"status": {"phase": "Ready", "observedGeneration": 1}}
    kubectl(
        "patch",
        "widget",
        "w1",
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps(status),
        namespace=namespace,
    )
    # A watch from the creation's resourceVersion replays the status change.
    watcher = watch.Watch()
    for event in watcher.stream(
        custom.list_namespaced_custom_object,
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        resource_version=created["metadata"]["resourceVersion"],
        timeout_seconds=20,
    ):
        assert event["type"] == "MODIFIED"
        assert event["object"]["status"] == {"phase": "Ready", "observedGeneration": 1}
        assert event["object"]["metadata"]["generation"] == 1
        break
    else:
        pytest.fail("the watch saw no event")

    # Status is only writable through /status; spec changes bump the generation.
    kubectl(
        "patch",
        "widget",
        "w1",
        "--type=merge",
        "-p",
        json.dumps({"spec": {"size": 3}, "status": {"phase": "Hacked"}}),
        namespace=namespace,
    )
    patched = _json(kubectl, "get", "widget", "w1", namespace=namespace)
    assert patched["status"]["phase"] == "Ready"
    assert (patched["spec"]["size"], patched["metadata"]["generation"]) == (3, 2)
    table = kubectl("get", "wd", "w1", namespace=namespace).stdout
    assert "PHASE" in table and "Ready" in table

    # A write from a stale resourceVersion is a conflict.
    stale = dict(created, spec={**created["spec"], "size": 4})
    with pytest.raises(ApiException) as conflict:
        custom.replace_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "w1", stale)
    assert conflict.value.status == 409

    # The schema and the CEL rule refuse bad objects, with the server's message.
    with pytest.raises(KubectlError) as too_small:
        kubectl("apply", "-f", "-", input=json.dumps(_widget("w2", size=0)), namespace=namespace)
    assert (
        "spec.size: Invalid value: 0: spec.size in body should be greater than or equal to 1"
        in (too_small.value.stderr)
    )
    with pytest.raises(KubectlError) as bad_mode:
        widget = _widget("w2", size=1, mode="reckless")
        kubectl("apply", "-f", "-", input=json.dumps(widget), namespace=namespace)
    assert 'spec.mode: Unsupported value: "reckless"' in bad_mode.value.stderr
    with pytest.raises(KubectlError) as cel:
        widget = _widget("w2", size=1, minReplicas=5, maxReplicas=2)
        kubectl("apply", "-f", "-", input=json.dumps(widget), namespace=namespace)
    assert "minReplicas must not exceed maxReplicas" in cel.value.stderr
    assert kubectl("get", "widget", "w2", check=False, namespace=namespace).returncode != 0


def _deployment(name: str, replicas: int, markers: Path) -> str:
    return json.dumps(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": {"app": name}},
                "template": {
                    "metadata": {"labels": {"app": name}},
                    "spec": {
                        "terminationGracePeriodSeconds": 10,
                        "containers": [
                            {
                                "name": "server",
                                "image": "analysisq:test",
                                "command": ["python", "-c", SERVER],
                                "env": [
                                    {"name": "MARKERS", "value": str(markers)},
                                    {
                                        "name": "POD_NAME",
                                        "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
                                    },
                                ],
                            }
                        ],
                    },
                },
            },
        }
    )


@pytest.mark.timeout(180)
def test_deployment_runs_scales_and_stops_real_processes(
    kubectl: Kubectl, pod_runner: PodRunner, namespace: str, tmp_path: Path
) -> None:
    kubectl("apply", "-f", "-", input=_deployment("web", 3, tmp_path), namespace=namespace)
    kubectl("rollout", "status", "deployment/web", "--timeout=60s", namespace=namespace)

    replica_sets = _json(kubectl, "get", "replicasets", "-l", "app=web", namespace=namespace)
    assert len(replica_sets["items"]) == 1
    assert replica_sets["items"][0]["status"]["readyReplicas"] == 3
    pods = _json(kubectl, "get", "pods", "-l", "app=web", namespace=namespace)["items"]
    assert len(pods) == 3
    for pod in pods:
        assert pod["status"]["phase"] == "Running"
        ready = {c["type"]: c["status"] for c in pod["status"]["conditions"]}
        assert ready["Ready"] == "True"
        (container,) = pod["status"]["containerStatuses"]
        assert (container["ready"], container["started"], container["restartCount"]) == (
            True,
            True,
            0,
        )
        assert pod["spec"]["nodeName"] == pod_runner.node_name
    processes = eventually(lambda: _three_started(pod_runner, namespace, tmp_path))
    assert all(_alive(pid) for pid in processes.values())

    kubectl("scale", "deployment/web", "--replicas=1", namespace=namespace)

    def scaled_down() -> dict[tuple[str, str], int]:
        remaining = pod_runner.pids(namespace)
        assert len(remaining) == 1, remaining
        exits = {
            (e.name, e.pid, e.exit_code)
            for e in pod_runner.events_for(namespace)
            if e.kind == "exited"
        }
        stopped = {
            (name, pid, 0) for (_, name), pid in processes.items() if pid not in remaining.values()
        }
        assert exits == stopped
        return remaining

    remaining = eventually(scaled_down, timeout=60)
    stopped = {key: pid for key, pid in processes.items() if key not in remaining}
    assert len(stopped) == 2
    for (_, pod_name), pid in stopped.items():
        # The marker proves the process itself handled SIGTERM before exiting 0.
        assert (tmp_path / f"{pod_name}.terminated").read_text() == str(pid)
        assert not _alive(pid)
    kubectl("rollout", "status", "deployment/web", "--timeout=60s", namespace=namespace)

    kubectl("delete", "deployment", "web", "--wait=true", namespace=namespace)

    def all_gone() -> None:
        assert pod_runner.pids(namespace) == {}
        assert _json(kubectl, "get", "pods", namespace=namespace)["items"] == []

    eventually(all_gone, timeout=60)
    assert not any(_alive(pid) for pid in processes.values())


def _three_started(runner: PodRunner, namespace: str, markers: Path) -> dict[tuple[str, str], int]:
    pids = runner.pids(namespace)
    assert len(pids) == 3, pids
    for (_, pod_name), pid in pids.items():
        assert (markers / f"{pod_name}.started").read_text() == str(pid)
    return pids


@pytest.mark.timeout(120)
def test_cronjob_creates_a_job_whose_pod_runs_to_completion(
    kubectl: Kubectl, pod_runner: PodRunner, namespace: str, tmp_path: Path
) -> None:
    script = (
        "import os, pathlib; print('daily run for', os.environ['RUN']);"
        " pathlib.Path(os.environ['OUT']).write_text(os.environ['RUN'])"
    )
    cronjob = {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": {"name": "daily"},
        "spec": {
            "schedule": "0 2 * * *",
            "timeZone": "Etc/UTC",
            "jobTemplate": {
                "spec": {
                    "backoffLimit": 0,
                    "template": {
                        "spec": {
                            "restartPolicy": "Never",
                            "containers": [
                                {
                                    "name": "trigger",
                                    "image": "analysisq:test",
                                    "command": ["python", "-c", script],
                                    "env": [
                                        {"name": "RUN", "value": "nightly"},
                                        {"name": "OUT", "value": str(tmp_path / "out")},
                                    ],
                                }
                            ],
                        }
                    },
                }
            },
        },
    }
    kubectl("apply", "-f", "-", input=json.dumps(cronjob), namespace=namespace)
    kubectl("create", "job", "manual-1", "--from=cronjob/daily", namespace=namespace)
    kubectl(
        "wait", "--for=condition=Complete", "job/manual-1", "--timeout=60s", namespace=namespace
    )

    assert (tmp_path / "out").read_text() == "nightly"
    job = _json(kubectl, "get", "job", "manual-1", namespace=namespace)
    assert job["status"]["succeeded"] == 1
    assert job["metadata"]["annotations"]["cronjob.kubernetes.io/instantiate"] == "manual"
    (pod,) = _json(kubectl, "get", "pods", "-l", "job-name=manual-1", namespace=namespace)["items"]
    assert pod["status"]["phase"] == "Succeeded"
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (terminated["exitCode"], terminated["reason"]) == (0, "Completed")
    log = pod_runner.log_path(namespace, pod["metadata"]["name"]).read_text()
    assert "daily run for nightly" in log

    # A failing command fails the Job (restartPolicy Never, no retries).
    failing = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "broken"},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {
                            "name": "main",
                            "image": "analysisq:test",
                            "command": ["python", "-c", "raise SystemExit(3)"],
                        }
                    ],
                }
            },
        },
    }
    kubectl("apply", "-f", "-", input=json.dumps(failing), namespace=namespace)
    kubectl("wait", "--for=condition=Failed", "job/broken", "--timeout=60s", namespace=namespace)
    (pod,) = _json(kubectl, "get", "pods", "-l", "job-name=broken", namespace=namespace)["items"]
    assert pod["status"]["phase"] == "Failed"
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 3


@pytest.mark.timeout(180)
def test_owner_deletion_collects_owned_objects_and_namespace_deletion_finishes(
    kubectl: Kubectl,
    kube_api: client.ApiClient,
    pod_runner: PodRunner,
    namespace: str,
    tmp_path: Path,
) -> None:
    core = client.CoreV1Api(kube_api)
    owner = core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "owner"}, "data": {"role": "owner"}}
    )
    reference = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "name": "owner",
        "uid": owner.metadata.uid,
    }
    for index in range(3):
        core.create_namespaced_config_map(
            namespace,
            {"metadata": {"name": f"owned-{index}", "ownerReferences": [reference]}},
        )
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "unrelated"}})
    kubectl("delete", "configmap", "owner", namespace=namespace)

    def collected() -> None:
        names = {
            item["metadata"]["name"]
            for item in _json(kubectl, "get", "configmaps", namespace=namespace)["items"]
        }
        assert not any(n.startswith("owned-") for n in names), names
        assert "unrelated" in names

    eventually(collected, timeout=60)

    # A namespace with running pods and assorted objects is deleted completely.
    doomed = f"doomed-{uuid.uuid4().hex[:6]}"
    kubectl("create", "namespace", doomed)
    try:
        eventually(lambda: kubectl("get", "serviceaccount", "default", namespace=doomed))
        kubectl("apply", "-f", "-", input=_deployment("web", 2, tmp_path), namespace=doomed)
        kubectl("create", "configmap", "settings", "--from-literal=a=b", namespace=doomed)
        kubectl("create", "secret", "generic", "creds", "--from-literal=k=v", namespace=doomed)
        kubectl("rollout", "status", "deployment/web", "--timeout=60s", namespace=doomed)
        pids = pod_runner.pids(doomed)
        assert len(pids) == 2
        kubectl("delete", "namespace", doomed, "--timeout=90s")
        assert kubectl("get", "namespace", doomed, check=False).returncode != 0
        assert pod_runner.pids(doomed) == {}
        assert not any(_alive(pid) for pid in pids.values())
        assert len(list(tmp_path.glob("*.terminated"))) == 2
    finally:
        kubectl("delete", "namespace", doomed, "--ignore-not-found", "--wait=false")


@pytest.mark.timeout(120)
def test_pod_environment_resolves_secrets_config_maps_and_fields(
    kubectl: Kubectl, pod_runner: PodRunner, namespace: str
) -> None:
    dump = "import json, os; print(json.dumps(dict(os.environ)))"
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "env", "labels": {"tier": "batch"}},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "main",
                    "image": "analysisq:test",
                    "command": ["python", "-c", dump],
                    "resources": {"limits": {"memory": "64Mi"}, "requests": {"cpu": "250m"}},
                    "envFrom": [
                        {"configMapRef": {"name": "settings"}},
                        {"secretRef": {"name": "provider"}, "prefix": "PROVIDER_"},
                    ],
                    "env": [
                        {"name": "PLAIN", "value": "plain value"},
                        {
                            "name": "DATABASE_URL",
                            "valueFrom": {"secretKeyRef": {"name": "db", "key": "url"}},
                        },
                        {
                            "name": "BATCH_SIZE",
                            "valueFrom": {
                                "configMapKeyRef": {"name": "settings", "key": "batch_size"}
                            },
                        },
                        {
                            "name": "MISSING_OPTIONAL",
                            "valueFrom": {
                                "secretKeyRef": {"name": "nope", "key": "x", "optional": True}
                            },
                        },
                        {
                            "name": "POD_NAME",
                            "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
                        },
                        {
                            "name": "POD_NAMESPACE",
                            "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
                        },
                        {
                            "name": "POD_IP",
                            "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}},
                        },
                        {
                            "name": "TIER",
                            "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['tier']"}},
                        },
                        # Expansion sees the variables defined before it.
                        {
                            "name": "EXPANDED",
                            "value": "$(PLAIN) in $(POD_NAMESPACE), $$(PLAIN), $(LATER)",
                        },
                        {"name": "LATER", "value": "later"},
                        {
                            "name": "MEMORY_MB",
                            "valueFrom": {
                                "resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}
                            },
                        },
                        {
                            "name": "CPU_MILLIS",
                            "valueFrom": {
                                "resourceFieldRef": {"resource": "requests.cpu", "divisor": "1m"}
                            },
                        },
                    ],
                }
            ],
        },
    }
    kubectl(
        "create",
        "configmap",
        "settings",
        "--from-literal=batch_size=50",
        "--from-literal=LOG_LEVEL=debug",
        namespace=namespace,
    )
    kubectl(
        "create",
        "secret",
        "generic",
        "provider",
        "--from-literal=API_KEY=sk-test",
        namespace=namespace,
    )
    kubectl("apply", "-f", "-", input=json.dumps(pod), namespace=namespace)

    # The Secret `db` does not exist yet: like kubelet, the runner waits and says why.
    def waiting_for_secret() -> None:
        status = _json(kubectl, "get", "pod", "env", namespace=namespace)["status"]
        waiting = status["containerStatuses"][0]["state"]["waiting"]
        assert waiting["reason"] == "CreateContainerConfigError"
        assert waiting["message"] == 'secret "db" not found'
        assert status["phase"] == "Pending"

    eventually(waiting_for_secret)
    kubectl(
        "create",
        "secret",
        "generic",
        "db",
        "--from-literal=url=postgresql://db/analysisq",
        namespace=namespace,
    )
    kubectl(
        "wait",
        "--for=jsonpath={.status.phase}=Succeeded",
        "pod/env",
        "--timeout=60s",
        namespace=namespace,
    )

    env = json.loads(pod_runner.log_path(namespace, "env").read_text().splitlines()[-1])
    expected = {
        "PLAIN": "plain value",
        "EXPANDED": f"plain value in {namespace}, $(PLAIN), $(LATER)",
        "DATABASE_URL": "postgresql://db/analysisq",
        "BATCH_SIZE": "50",
        "batch_size": "50",
        "LOG_LEVEL": "debug",
        "PROVIDER_API_KEY": "sk-test",
        "POD_NAME": "env",
        "POD_NAMESPACE": namespace,
        "POD_IP": "127.0.0.1",
        "TIER": "batch",
        "HOSTNAME": "env",
        "MEMORY_MB": "64",
        "CPU_MILLIS": "250",
    }
    assert {key: env.get(key) for key in expected} == expected
    assert "MISSING_OPTIONAL" not in env
    # Commands resolve in the project's virtualenv first.
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)


async def test_kubectl_runs_without_blocking_the_event_loop(kubectl: Kubectl) -> None:
    result = await kubectl.run_async("get", "namespace", "default", "-o", "name")
    assert result.stdout.strip() == "namespace/default"
    with pytest.raises(KubectlError) as missing:
        await kubectl.run_async("get", "namespace", "no-such-namespace")
    assert 'namespaces "no-such-namespace" not found' in str(missing.value)

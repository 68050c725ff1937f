"""The pod runner acts like kubelet where the operator's tests depend on it: restarts after a
kill -9, restart policies, SIGKILL after the grace period, service-account credentials under
RBAC, and no process left behind when it stops."""

from __future__ import annotations

import json
import os
import signal
import textwrap
from pathlib import Path
from typing import Any

import pytest

from controlplane.fixtures import Kubectl, eventually
from controlplane.harness import ControlPlane
from controlplane.podrunner import PodRunner

pytestmark = pytest.mark.cluster

SLEEPER = "import time\nwhile True: time.sleep(0.2)"


def _container(command: str, **extra: Any) -> dict[str, Any]:
    return {"name": "main", "image": "analysisq:test", "command": ["python", "-c", command]} | extra


def _pod(name: str, command: str, restart_policy: str, **spec: Any) -> str:
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name},
            "spec": {"restartPolicy": restart_policy, "containers": [_container(command)]} | spec,
        }
    )


def _get(kubectl: Kubectl, namespace: str, *args: str) -> Any:
    return json.loads(kubectl("get", *args, "-o", "json", namespace=namespace).stdout)


def test_node_is_registered_ready_without_taints(kubectl: Kubectl, pod_runner: PodRunner) -> None:
    node = json.loads(kubectl("get", "node", pod_runner.node_name, "-o", "json").stdout)
    conditions = {c["type"]: c["status"] for c in node["status"]["conditions"]}
    assert conditions["Ready"] == "True"
    assert not node["spec"].get("taints")
    assert int(node["status"]["allocatable"]["cpu"]) >= 1


@pytest.mark.timeout(120)
def test_killed_process_of_a_deployment_is_restarted_and_reported(
    kubectl: Kubectl, pod_runner: PodRunner, namespace: str
) -> None:
    kubectl(
        "create",
        "deployment",
        "worker",
        "--image=analysisq:test",
        "--",
        "python",
        "-c",
        SLEEPER,
        namespace=namespace,
    )
    kubectl("rollout", "status", "deployment/worker", "--timeout=60s", namespace=namespace)
    (pod,) = _get(kubectl, namespace, "pods", "-l", "app=worker")["items"]
    name = pod["metadata"]["name"]
    first = pod_runner.wait_for_pid(namespace, name)

    os.kill(first, signal.SIGKILL)

    def restarted() -> dict[str, Any]:
        pid = pod_runner.pid_of(namespace, name)
        assert pid is not None and pid != first
        status = _get(kubectl, namespace, "pod", name)["status"]
        (container,) = status["containerStatuses"]
        assert container["restartCount"] == 1
        assert container["ready"] is True
        assert "running" in container["state"]
        return dict(container["lastState"]["terminated"])

    last = eventually(restarted)
    assert (last["exitCode"], last["reason"]) == (137, "Error")
    exits = [e for e in pod_runner.events_for(namespace, name) if e.kind == "exited"]
    assert [(e.pid, e.exit_code) for e in exits] == [(first, 137)]


@pytest.mark.timeout(120)
def test_on_failure_pod_is_restarted_until_it_succeeds(
    kubectl: Kubectl, pod_runner: PodRunner, namespace: str, tmp_path: Path
) -> None:
    flaky = textwrap.dedent(
        f"""
        import pathlib, sys
        tries = pathlib.Path({str(tmp_path / "tries")!r})
        tries.write_text(tries.read_text() + "x" if tries.exists() else "x")
        sys.exit(0 if len(tries.read_text()) >= 2 else 1)
        """
    )
    kubectl("apply", "-f", "-", input=_pod("flaky", flaky, "OnFailure"), namespace=namespace)
    kubectl(
        "wait",
        "--for=jsonpath={.status.phase}=Succeeded",
        "pod/flaky",
        "--timeout=60s",
        namespace=namespace,
    )
    (container,) = _get(kubectl, namespace, "pod", "flaky")["status"]["containerStatuses"]
    assert container["restartCount"] == 1
    assert container["lastState"]["terminated"]["exitCode"] == 1
    assert container["state"]["terminated"]["exitCode"] == 0
    assert (tmp_path / "tries").read_text() == "xx"


@pytest.mark.timeout(120)
def test_process_ignoring_sigterm_is_killed_after_the_grace_period(
    kubectl: Kubectl, pod_runner: PodRunner, namespace: str
) -> None:
    stubborn = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n" + SLEEPER
    manifest = _pod("stubborn", stubborn, "Always", terminationGracePeriodSeconds=2)
    kubectl("apply", "-f", "-", input=manifest, namespace=namespace)
    pid = pod_runner.wait_for_pid(namespace, "stubborn")

    kubectl("delete", "pod", "stubborn", "--timeout=30s", namespace=namespace)

    def removed() -> None:
        kinds = [e.kind for e in pod_runner.events_for(namespace, "stubborn")]
        assert kinds == ["started", "terminating", "killed", "exited", "removed"]

    eventually(removed, timeout=10)
    exited = next(e for e in pod_runner.events_for(namespace, "stubborn") if e.kind == "exited")
    assert (exited.pid, exited.exit_code) == (pid, 137)
    terminating, killed = (
        next(e for e in pod_runner.events_for(namespace, "stubborn") if e.kind == k)
        for k in ("terminating", "killed")
    )
    assert 1.8 <= killed.at - terminating.at < 5


ACCESS = textwrap.dedent(
    """
    from kubernetes import client, config
    from kubernetes.client.exceptions import ApiException
    config.load_kube_config()
    try:
        client.CoreV1Api().list_namespaced_config_map(open("namespace").read())
        print("allowed")
    except ApiException as exc:
        print("denied", exc.status)
    """
)


@pytest.mark.timeout(120)
def test_pod_gets_its_service_account_credentials_under_rbac(
    kubectl: Kubectl, pod_runner: PodRunner, namespace: str
) -> None:
    # The script reads its namespace from a file in its working directory (the pod's dir).
    command = f"open('namespace', 'w').write({namespace!r})\n" + ACCESS
    kubectl("create", "serviceaccount", "reader", namespace=namespace)
    kubectl(
        "apply",
        "-f",
        "-",
        namespace=namespace,
        input=_pod("before", command, "Never", serviceAccountName="reader"),
    )
    kubectl(
        "wait",
        "--for=jsonpath={.status.phase}=Succeeded",
        "pod/before",
        "--timeout=60s",
        namespace=namespace,
    )
    assert pod_runner.log_path(namespace, "before").read_text().split() == ["denied", "403"]

    kubectl(
        "create", "role", "read-config", "--verb=list", "--resource=configmaps", namespace=namespace
    )
    kubectl(
        "create",
        "rolebinding",
        "reader",
        "--role=read-config",
        f"--serviceaccount={namespace}:reader",
        namespace=namespace,
    )
    kubectl(
        "apply",
        "-f",
        "-",
        namespace=namespace,
        input=_pod("after", command, "Never", serviceAccountName="reader"),
    )
    kubectl(
        "wait",
        "--for=jsonpath={.status.phase}=Succeeded",
        "pod/after",
        "--timeout=60s",
        namespace=namespace,
    )
    assert pod_runner.log_path(namespace, "after").read_text().split() == ["allowed"]


@pytest.mark.timeout(120)
def test_stopping_a_runner_kills_its_processes(
    control_plane: ControlPlane, kubectl: Kubectl, namespace: str, tmp_path: Path
) -> None:
    node = f"second-{namespace[-6:]}"
    runner = PodRunner(
        control_plane.kubeconfig, workdir=tmp_path, node_name=node, namespaces={namespace}
    )
    runner.start()
    try:
        # Pre-bound to the second node, so the session's runner leaves it alone.
        manifest = _pod("pinned", SLEEPER, "Always", nodeName=node)
        kubectl("apply", "-f", "-", input=manifest, namespace=namespace)
        pid = runner.wait_for_pid(namespace, "pinned")
        kubectl("wait", "--for=condition=Ready", "pod/pinned", "--timeout=30s", namespace=namespace)
    finally:
        runner.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert runner.pids() == {}
    kubectl("delete", "pod", "pinned", "--grace-period=0", "--force", namespace=namespace)
    kubectl("delete", "node", node)

"""The shipped image and chart on a real kubelet: what every cluster user meets first.

One ``helm install`` of ``charts/analysisq`` with the image built from the Dockerfile (same
entrypoint, non-root, read-only root filesystem, restricted Pod Security): the migration hook
Job, the operator Deployment (liveness probe, metrics Service through kube-proxy), and the
fake provider running in the cluster from the same image behind a Service. Then, each on a
new AnalysisRun of the same prompts: a run to completion with workers scaled to 0; a worker
container SIGKILLed (kubelet restarts it, its items come back, no duplicate result); a busy
worker pod deleted (SIGTERM: it releases its items, which costs no attempt); the operator pod
deleted mid-run (its replacement finishes the run); the daily CronJob run by hand; and the
operational faults: a missing database Secret and a worker image that cannot be pulled, each
a readable condition and Event on the AnalysisRun.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

from controlplane.fixtures import Kubectl, eventually
from controlplane.nodeconfig import PAUSE_IMAGE
from controlplane.nodefixtures import RealNode
from support import add_prompts
from tools.cluster import apply_analysisrun_crd, create_namespace, delete_namespace
from tools.helm import CHART, helm_binary, run_helm

pytestmark = [pytest.mark.node, pytest.mark.timeout(600)]

PROMPTS = 300
FAKE_PORT = 8000
WORKER_SELECTOR = "app.kubernetes.io/component=worker"


@dataclass
class Install:
    rn: RealNode
    namespace: str
    db: str
    """URL of the release's database from this process."""
    endpoint: str
    """The fake provider's ClusterIP URL (what pods use)."""

    @property
    def kubectl(self) -> Kubectl:
        return self.rn.kubectl

    def k(self, *args: str, check: bool = True, timeout: float = 60) -> str:
        return self.kubectl(*args, namespace=self.namespace, check=check, timeout=timeout).stdout

    def get(self, kind: str, name: str) -> dict[str, Any]:
        return dict(json.loads(self.k("get", kind, name, "-o", "json")))

    def pods(self, selector: str) -> list[dict[str, Any]]:
        return list(json.loads(self.k("get", "pods", "-l", selector, "-o", "json"))["items"])

    def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        async def go() -> list[asyncpg.Record]:
            conn = await asyncpg.connect(self.db)
            try:
                return list(await conn.fetch(sql, *args))
            finally:
                await conn.close()

        return asyncio.run(go())

    def apply_run(self, name: str, **spec: Any) -> None:
        body = {
            "targets": [
                {
                    "name": "fake",
                    "provider": "openai",
                    "model": "fake-1",
                    "endpoint": self.endpoint,
                    "apiKeySecretRef": {"name": "fake-provider", "key": "api-key"},
                }
            ],
            "workers": 3,
            "batchSize": 5,
            "leaseSeconds": 15,
            **spec,
        }
        run = {"apiVersion": "analysisq.io/v1alpha1", "kind": "AnalysisRun",
               "metadata": {"name": name}, "spec": body}  # fmt: skip
        self.kubectl("apply", "-f", "-", input=json.dumps(run), namespace=self.namespace)

    def wait_complete(self, name: str, timeout: int = 300) -> dict[str, Any]:
        done = self.kubectl(
            "wait", "--for=condition=Complete", f"analysisrun/{name}", f"--timeout={timeout}s",
            namespace=self.namespace, check=False, timeout=timeout + 10,
        )  # fmt: skip
        assert done.returncode == 0, f"{done.stderr}\n{self.diagnose()}"
        return self.get("analysisrun", name)

    def run_id(self, name: str) -> str:
        return str(self.get("analysisrun", name)["status"]["runId"])

    def completed(self, name: str) -> int:
        run_id = (self.get("analysisrun", name).get("status") or {}).get("runId")
        if not run_id:
            return 0
        rows = self.fetch(
            "SELECT count(*) AS n FROM analysis_queue WHERE run_id = $1 AND status = 'completed'",
            run_id,
        )
        return int(rows[0]["n"])

    def diagnose(self) -> str:
        """Pods, events and the operator's log, for failure messages."""
        parts = [self.k("get", "pods,deployments,analysisruns", "-o", "wide", check=False)]
        parts.append(self.k("get", "events", "--sort-by=.lastTimestamp", check=False)[-4000:])
        parts.append(
            self.k("logs", "deployment/analysisq-operator", "--tail=60", check=False)[-6000:]
        )
        return "\n".join(parts)


def _secret(name: str, **data: str) -> str:
    encoded = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
    return json.dumps({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
                       "data": encoded})  # fmt: skip


def _restricted() -> tuple[dict[str, Any], dict[str, Any]]:
    pod = {"runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532,
           "seccompProfile": {"type": "RuntimeDefault"}}  # fmt: skip
    container = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                 "capabilities": {"drop": ["ALL"]}}  # fmt: skip
    return pod, container


def _fake_provider(image: str) -> str:
    """The fake provider as users of the image would run it: a Deployment and a Service."""
    pod_sc, container_sc = _restricted()
    labels = {"app": "fake-provider"}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "fake-provider"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "automountServiceAccountToken": False,
                    "securityContext": pod_sc,
                    "containers": [
                        {
                            "name": "fake",
                            "image": image,
                            "imagePullPolicy": "IfNotPresent",
                            "args": [
                                "fake-provider",
                                "--host=0.0.0.0",
                                f"--port={FAKE_PORT}",
                                "--latency-ms=800",
                            ],
                            "ports": [{"containerPort": FAKE_PORT, "name": "http"}],
                            "readinessProbe": {
                                "httpGet": {"path": "/stats", "port": "http"},
                                "periodSeconds": 2,
                            },
                            "securityContext": container_sc,
                            "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
                        }
                    ],
                    "volumes": [{"name": "tmp", "emptyDir": {}}],
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "fake-provider"},
        "spec": {"selector": labels, "ports": [{"port": 80, "targetPort": "http"}]},
    }
    return json.dumps(deployment) + "\n" + json.dumps(service)


def _seed(url: str) -> None:
    async def go() -> None:
        conn = await asyncpg.connect(url)
        try:
            await add_prompts(conn, PROMPTS)
        finally:
            await conn.close()

    asyncio.run(go())


def _helm(rn: RealNode, namespace: str, *args: str) -> None:
    name, tag = rn.image.rsplit(":", 1)
    run_helm(
        helm_binary(), *args, "analysisq", str(CHART), "--namespace", namespace,
        f"--set=image.repository={name}", f"--set=image.tag={tag}",
        "--set=operator.reconcileSeconds=2", "--set=worker.graceSeconds=30",
        "--set=trigger.template.workers=2",
        kubeconfig=rn.control_plane.kubeconfig, timeout=300,
    )  # fmt: skip


@pytest.fixture(scope="module")
def install(real_node: RealNode) -> Iterator[Install]:
    rn = real_node
    namespace = f"node-{int(time.time()) % 100000}"
    apply_analysisrun_crd(rn.kubectl)
    create_namespace(rn.kubectl, namespace, restricted=True)
    local, for_pods = rn.new_database()
    rn.kubectl("apply", "-f", "-", input=_secret("analysisq-database", url=for_pods),
               namespace=namespace)  # fmt: skip
    rn.kubectl("apply", "-f", "-", input=_secret("fake-provider", **{"api-key": "sk-fake"}),
               namespace=namespace)  # fmt: skip
    rn.kubectl("apply", "-f", "-", input=_fake_provider(rn.image), namespace=namespace)
    ip = rn.kubectl("get", "service", "fake-provider", "-o", "jsonpath={.spec.clusterIP}",
                    namespace=namespace).stdout.strip()  # fmt: skip
    inst = Install(rn, namespace, local, f"http://{ip}/v1")
    try:
        _helm(rn, namespace, "install")
        inst.k("rollout", "status", "deployment/fake-provider", "--timeout=120s", timeout=130)
        _seed(local)
        yield inst
    finally:
        delete_namespace(rn.kubectl, namespace)


def _in_node(rn: RealNode, url: str, body: dict[str, Any] | None = None) -> str:
    """GET ``url`` (POST ``body`` as JSON) from the node's network namespace (ClusterIPs are
    routed there)."""
    data = None if body is None else json.dumps(body).encode()
    code = (
        "import urllib.request as r; print(r.urlopen(r.Request("
        f"{url!r}, data={data!r}, headers={{'Content-Type': 'application/json'}}),"
        " timeout=10).read().decode())"
    )
    result = rn.node.in_netns([sys.executable, "-c", code])
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_the_chart_runs_migrations_and_the_operator_with_its_probes(install: Install) -> None:
    # The pre-install hook migrated the database before helm went on.
    rows = install.fetch("SELECT max(version) AS v FROM analysisq_migrations")
    assert rows[0]["v"] >= 1
    install.k("rollout", "status", "deployment/analysisq-operator", "--timeout=120s", timeout=130)
    (pod,) = install.pods("app.kubernetes.io/component=operator")
    spec = pod["spec"]["containers"][0]
    assert spec["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["spec"]["securityContext"]["runAsUser"] == 65532

    # Readiness (kopf serves /healthz) and liveness (initial delay 10 s, every 20 s) pass:
    # ready, and no restart after the liveness probe ran twice.
    def probed_and_ready() -> dict[str, Any]:
        (current,) = install.pods("app.kubernetes.io/component=operator")
        status = current["status"]["containerStatuses"][0]
        running = status["state"].get("running")
        assert running, f"the operator is not running: {status}"
        started = datetime.fromisoformat(running["startedAt"])
        assert (datetime.now(UTC) - started).total_seconds() > 35, "probe not run twice yet"
        return dict(status)

    status = eventually(probed_and_ready, timeout=90, interval=2)
    assert status["ready"] is True and status["restartCount"] == 0, install.diagnose()

    # The metrics Service answers on its ClusterIP, through kube-proxy.
    ip = install.k("get", "service", "analysisq-metrics",
                   "-o", "jsonpath={.spec.clusterIP}").strip()  # fmt: skip
    assert "analysisq_" in _in_node(install.rn, f"http://{ip}:9090/metrics")


def test_a_run_completes_and_its_workers_scale_to_zero(install: Install) -> None:
    install.apply_run("first")
    run = install.wait_complete("first")
    assert run["status"]["phase"] == "Succeeded", install.diagnose()
    assert run["status"]["counts"]["completed"] == PROMPTS
    rows = install.fetch(
        "SELECT count(*) AS n, count(DISTINCT queue_id) AS items FROM analysis_results"
        " WHERE run_id = $1",
        install.run_id("first"),
    )
    assert rows[0]["n"] == rows[0]["items"] == PROMPTS

    def scaled_to_zero() -> None:
        deployment = install.get("deployment", "first-workers")
        assert deployment["spec"]["replicas"] == 0
        assert not install.pods(f"{WORKER_SELECTOR},analysisq.io/run=first")

    eventually(scaled_to_zero, timeout=90, interval=1)


def _busy_worker(install: Install, run: str) -> tuple[str, list[asyncpg.Record]]:
    """A worker pod of ``run`` holding items, and those items."""

    def holding() -> tuple[str, list[asyncpg.Record]]:
        for pod in install.pods(f"{WORKER_SELECTOR},analysisq.io/run={run}"):
            name = pod["metadata"]["name"]
            rows = install.fetch(
                "SELECT id, attempts, lease_losses FROM analysis_queue WHERE run_id = $1"
                " AND status = 'processing' AND lease_owner LIKE $2",
                install.run_id(run), f"{name}:%",
            )  # fmt: skip
            if rows:
                return name, rows
        raise AssertionError(f"no worker of {run} holds items yet")

    return eventually(holding, timeout=180, interval=0.5)


def _assert_once_each(install: Install, run: str) -> None:
    rows = install.fetch(
        "SELECT count(*) AS n, count(DISTINCT queue_id) AS items FROM analysis_results"
        " WHERE run_id = $1",
        install.run_id(run),
    )
    assert rows[0]["n"] == rows[0]["items"] == PROMPTS, dict(rows[0])


def test_a_sigkilled_worker_is_restarted_and_its_items_come_back(install: Install) -> None:
    install.apply_run("killed")
    pod, _ = _busy_worker(install, "killed")
    pids = install.rn.node.container_pids(install.namespace, pod, "worker")
    assert pids, f"no process found for {pod}"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)

    def restarted() -> None:
        (status,) = install.get("pod", pod)["status"]["containerStatuses"]
        assert status["restartCount"] >= 1, status

    eventually(restarted, timeout=120, interval=1)
    run = install.wait_complete("killed")
    assert run["status"]["counts"]["completed"] == PROMPTS, install.diagnose()
    _assert_once_each(install, "killed")
    # What the killed worker held came back through its expired leases (a worker always
    # holds a batch: the provider answers in 0.8 s).
    lost = install.fetch(
        "SELECT count(*) AS n FROM analysis_queue WHERE run_id = $1 AND lease_losses > 0",
        install.run_id("killed"),
    )
    assert lost[0]["n"] >= 1


def _fake_latency(install: Install, ms: int) -> None:
    """Change the in-cluster fake provider's latency for the requests it admits from now."""
    config = install.endpoint.removesuffix("/v1") + "/config"
    assert json.loads(_in_node(install.rn, config, {"latency_ms": ms}))["latency_ms"] == ms


def test_a_deleted_busy_worker_releases_its_items_without_spending_attempts(
    install: Install,
) -> None:
    install.apply_run("deleted")
    _busy_worker(install, "deleted")
    # Calls slower than the worker's shutdown grace (2/3 of graceSeconds: 20 s) and within the
    # target's timeout (60 s): what the deleted worker holds is still in flight when its grace
    # ends, so only a release (before the kubelet's SIGKILL at 30 s) gives it back in time.
    _fake_latency(install, 40_000)
    try:
        time.sleep(3)  # the calls sent before (0.8 s) are over; every call now is slow
        pod, held = _busy_worker(install, "deleted")
        before = {r["id"]: r["attempts"] for r in held}
        began = time.monotonic()
        install.k("delete", "pod", pod, "--wait=true", "--timeout=60s", timeout=70)
        gone_after = time.monotonic() - began
        rows = install.fetch(
            "SELECT id, status, attempts, lease_losses, lease_owner FROM analysis_queue"
            " WHERE id = ANY($1::bigint[])",
            list(before),
        )
    finally:
        _fake_latency(install, 800)
    assert gone_after < 30 + 5, f"the worker took {gone_after:.0f} s to stop (grace 30 s)"
    assert len(rows) == len(before)
    for row in rows:
        # Released by the worker itself (no lease ran out), not left to the rescuer.
        assert row["lease_losses"] == 0, dict(row)
        assert not str(row["lease_owner"]).startswith(f"{pod}:"), dict(row)
        if row["status"] == "pending":
            assert row["attempts"] == before[row["id"]] - 1, dict(row)  # claim given back
        else:  # claimed again by another worker: the release cost no attempt
            assert row["attempts"] == before[row["id"]], dict(row)
    run = install.wait_complete("deleted")
    assert run["status"]["counts"]["completed"] == PROMPTS, install.diagnose()
    _assert_once_each(install, "deleted")
    answered = install.fetch(
        "SELECT r.queue_id, r.attempt, q.lease_losses FROM analysis_results r"
        " JOIN analysis_queue q ON q.id = r.queue_id WHERE r.queue_id = ANY($1::bigint[])",
        list(before),
    )
    assert {(r["queue_id"], r["attempt"], r["lease_losses"]) for r in answered} == {
        (i, n, 0) for i, n in before.items()
    }


def test_the_operator_replaced_mid_run_finishes_the_run(install: Install) -> None:
    install.apply_run("orphaned")
    eventually(lambda: install.completed("orphaned") > 0 or None, timeout=120)
    (old,) = install.pods("app.kubernetes.io/component=operator")
    install.k("delete", "pod", old["metadata"]["name"], "--grace-period=0", "--force")
    run = install.wait_complete("orphaned")
    assert run["status"]["counts"]["completed"] == PROMPTS, install.diagnose()
    (new,) = install.pods("app.kubernetes.io/component=operator")
    assert new["metadata"]["name"] != old["metadata"]["name"]
    _assert_once_each(install, "orphaned")


def test_the_daily_cronjob_run_by_hand_completes(install: Install) -> None:
    install.k("create", "job", "--from=cronjob/analysisq-trigger", "by-hand")
    install.k("wait", "--for=condition=Complete", "job/by-hand", "--timeout=180s", timeout=190)
    today = datetime.now(UTC).strftime("%Y%m%d")
    run = install.wait_complete(f"daily-{today}")
    assert run["status"]["phase"] == "Succeeded", install.diagnose()
    assert run["status"]["counts"]["completed"] == PROMPTS


def _condition(install: Install, run: str, reason: str) -> dict[str, Any]:
    def degraded() -> dict[str, Any]:
        status = install.get("analysisrun", run).get("status") or {}
        found = [c for c in status.get("conditions") or [] if c["type"] == "Degraded"]
        assert found and found[0]["status"] == "True", status
        assert found[0]["reason"] == reason, found[0]
        return dict(found[0])

    return eventually(degraded, timeout=180, interval=1)


def _events(install: Install, run: str) -> list[dict[str, Any]]:
    selector = f"involvedObject.kind=AnalysisRun,involvedObject.name={run}"
    out = install.k("get", "events", "--field-selector", selector, "-o", "json")
    return list(json.loads(out)["items"])


def test_a_missing_database_secret_is_a_condition_and_an_event(install: Install) -> None:
    install.apply_run("no-secret", databaseSecretRef={"name": "nowhere", "key": "url"})
    condition = _condition(install, "no-secret", "SecretMissing")
    assert "nowhere" in condition["message"]
    events = _events(install, "no-secret")
    assert any(e["reason"] == "SecretMissing" and "nowhere" in e["message"] for e in events)


@pytest.mark.parametrize(
    ("image", "reasons"),
    [
        # Not on the node and not pullable (IfNotPresent): the kubelet's pull fails.
        ("localhost/analysisq-missing:0", ("ErrImagePull", "ImagePullBackOff")),
        # On the node (the pod sandbox image) but without an `analysisq` to run: runc cannot
        # start the container, and the kubelet backs off restarting it.
        (PAUSE_IMAGE, ("RunContainerError", "CrashLoopBackOff")),
    ],
    ids=["cannot-be-pulled", "cannot-start"],
)
def test_a_worker_image_that_cannot_run_is_a_condition_and_an_event(
    install: Install, image: str, reasons: tuple[str, ...]
) -> None:
    _helm(install.rn, install.namespace, "upgrade",
          "--set=operator.extraEnv[0].name=ANALYSISQ_WORKER_IMAGE",
          f"--set=operator.extraEnv[0].value={image}")  # fmt: skip
    run = f"bad-image-{reasons[0].lower()}"
    try:
        install.k("rollout", "status", "deployment/analysisq-operator", "--timeout=120s",
                  timeout=130)  # fmt: skip
        install.apply_run(run)
        condition = _condition(install, run, "WorkersFailing")
        assert any(r in condition["message"] for r in reasons), condition
        events = _events(install, run)
        assert any(e["reason"] == "WorkersFailing" for e in events), events
        if image != PAUSE_IMAGE:
            assert image in condition["message"], condition
        else:  # the runtime's own words say what is wrong, in a crash loop too
            assert "executable file not found" in condition["message"], condition
    finally:
        _helm(install.rn, install.namespace, "upgrade")

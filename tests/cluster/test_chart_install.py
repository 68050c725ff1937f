"""``helm install`` for real: the migration hook, the operator under the chart's RBAC, a run.

Everything in the chart runs as its own ServiceAccount through the pod runner: the
pre-install hook Job migrates an empty database (``analysisq migrate``), the operator pod
starts with the operator ServiceAccount's token (so its Role is proven sufficient, not only
plausible), an applied AnalysisRun gets a worker Deployment whose pods drain the queue with
the echo provider, and the daily CronJob's run completes the same way. ``helm upgrade``
runs the hook again (idempotent) and ``helm uninstall`` removes what the chart made.
"""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import Iterator

import asyncpg
import pytest

from controlplane.fixtures import Kubectl, eventually
from controlplane.harness import ControlPlane, free_port
from controlplane.podrunner import PodRunner
from support import add_prompts
from tools.cluster import apply_analysisrun_crd, wait_job_complete
from tools.helm import CHART, DEPLOY, helm_binary, run_helm

pytestmark = pytest.mark.cluster

PROMPTS = 40


@pytest.fixture
def database(pg_admin_url: str) -> Iterator[str]:
    """An empty database (not migrated: the chart's hook does that)."""
    name = f"aq_chart_{uuid.uuid4().hex[:8]}"
    base = pg_admin_url.rpartition("/")[0]

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(pg_admin_url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    yield f"{base}/{name}"
    asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def _seed(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        await add_prompts(conn, PROMPTS)
        version = await conn.fetchval("SELECT max(version) FROM analysisq_migrations")
        return int(version)
    finally:
        await conn.close()


def _run(kubectl: Kubectl, namespace: str, name: str) -> dict[str, object]:
    out = kubectl("get", "analysisrun", name, "-o", "json", namespace=namespace).stdout
    return dict(json.loads(out))


@pytest.mark.timeout(420)
def test_helm_install_runs_migrations_operator_and_a_daily_run(
    kubectl: Kubectl,
    control_plane: ControlPlane,
    pod_runner: PodRunner,
    namespace: str,
    database: str,
) -> None:
    helm = helm_binary()
    apply_analysisrun_crd(kubectl)
    encoded = base64.b64encode(database.encode()).decode()
    kubectl(
        "apply",
        "-f",
        "-",
        input=json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "analysisq-database"},
                "data": {"url": encoded},
            }
        ),
        namespace=namespace,
    )
    release = ["analysisq", str(CHART), "--namespace", namespace]
    settings = [
        # Pods share this machine's network: no fixed ports.
        f"--set=operator.healthPort={free_port()}",
        f"--set=metrics.port={free_port()}",
        "--set=operator.reconcileSeconds=1",
        "--set=trigger.template.workers=2",
    ]
    kubeconfig = control_plane.kubeconfig

    def operator_log() -> str:
        pods = json.loads(
            kubectl(
                "get", "pods", "-l", "app.kubernetes.io/component=operator", "-o", "json",
                namespace=namespace,
            ).stdout
        )["items"]  # fmt: skip
        return "\n".join(
            pod_runner.log_path(namespace, p["metadata"]["name"]).read_text()[-4000:]
            for p in pods
            if pod_runner.log_path(namespace, p["metadata"]["name"]).exists()
        )

    try:
        # The pre-install hook must finish before anything else is created: helm waits.
        run_helm(helm, "install", *release, *settings, kubeconfig=kubeconfig, timeout=240)
        assert asyncio.run(_seed(database)) >= 1, "the hook did not migrate the database"
        kubectl(
            "rollout", "status", "deployment/analysisq-operator", "--timeout=60s",
            namespace=namespace,
        )  # fmt: skip

        kubectl("apply", "-f", str(DEPLOY / "examples" / "one-target.yaml"), namespace=namespace)
        done = kubectl(
            "wait", "--for=condition=Complete", "analysisrun/one-target", "--timeout=150s",
            namespace=namespace, check=False, timeout=160,
        )  # fmt: skip
        assert done.returncode == 0, f"{done.stderr}\n{operator_log()}"
        run = _run(kubectl, namespace, "one-target")
        assert run["status"]["counts"]["completed"] == PROMPTS  # type: ignore[index]
        assert run["status"]["phase"] == "Succeeded"  # type: ignore[index]

        # The daily run, through the CronJob, processed by the same operator.
        kubectl("create", "job", "--from=cronjob/analysisq-trigger", "today", namespace=namespace)
        wait_job_complete(kubectl, namespace, "today", pod_log=pod_runner.log_path)
        (daily,) = [
            name
            for name in kubectl(
                "get", "analysisruns", "-o", "name", namespace=namespace
            ).stdout.split()
            if name.startswith("analysisrun.analysisq.io/daily-")
        ]
        done = kubectl(
            "wait", "--for=condition=Complete", daily, "--timeout=150s",
            namespace=namespace, check=False, timeout=160,
        )  # fmt: skip
        assert done.returncode == 0, f"{done.stderr}\n{operator_log()}"
        assert "Forbidden" not in operator_log() and "forbidden" not in operator_log()

        # Upgrade: the hook runs again on the migrated database, the operator rolls.
        run_helm(
            helm, "upgrade", *release, *settings, "--set=operator.reconcileSeconds=2",
            kubeconfig=kubeconfig, timeout=240,
        )  # fmt: skip
        kubectl(
            "rollout", "status", "deployment/analysisq-operator", "--timeout=60s",
            namespace=namespace,
        )  # fmt: skip
    finally:
        run_helm(
            helm, "uninstall", "analysisq", "--namespace", namespace, "--wait",
            kubeconfig=kubeconfig, timeout=120,
        )  # fmt: skip

    def operator_gone() -> None:
        assert not pod_runner.pids(namespace), pod_runner.pids(namespace)

    eventually(operator_gone, timeout=60)
    left = kubectl("get", "clusterroles", "-o", "name").stdout
    assert f"analysisq-operator-{namespace}" not in left

"""The daily trigger end to end: the chart's CronJob, the controller-manager and the pod runner.

``kubectl create job --from=cronjob/...`` makes the Job the CronJob would make at 02:00 UTC;
the job controller creates its pod; the pod runner runs ``analysisq trigger`` with the
trigger ServiceAccount's own token (so the Role is what is tested, not admin rights). The
day's AnalysisRun appears once, a second trigger creates nothing, and finished runs beyond
``trigger.keep`` are pruned. The command itself is also run against the API server for the
backfill and its error messages. The operator is scaled to 0: nothing else touches the runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from controlplane.fixtures import Kubectl, eventually
from controlplane.harness import ControlPlane
from controlplane.podrunner import PodRunner
from tools.cluster import apply_analysisrun_crd, apply_stream, delete_stream, wait_job_complete
from tools.helm import helm_binary, render

pytestmark = pytest.mark.cluster

TEMPLATE_TARGETS = [{"name": "echo", "provider": "echo", "model": "echo-1"}]
CRONJOB = "analysisq-trigger"
TEMPLATE = "analysisq-run-template"


@pytest.fixture(scope="module")
def helm() -> Path:
    return helm_binary()


def install(helm: Path, kubectl: Kubectl, namespace: str, *extra: str) -> str:
    apply_analysisrun_crd(kubectl)
    stream = render(
        helm,
        namespace=namespace,
        set_values=[
            "operator.replicas=0",
            "migrations.enabled=false",
            "trigger.keep=2",
            "trigger.deadlineIn=6h",
            *extra,
        ],
    )
    apply_stream(kubectl, stream)
    return stream


def runs(kubectl: Kubectl, namespace: str) -> dict[str, dict[str, Any]]:
    out = kubectl("get", "analysisruns", "-o", "json", namespace=namespace).stdout
    return {item["metadata"]["name"]: item for item in json.loads(out)["items"]}


def finished_run(kubectl: Kubectl, namespace: str, name: str, phase: str, label: bool) -> None:
    labels = {"analysisq.io/trigger": "daily"} if label else {}
    manifest = {
        "apiVersion": "analysisq.io/v1alpha1",
        "kind": "AnalysisRun",
        "metadata": {"name": name, "labels": labels},
        "spec": {"targets": TEMPLATE_TARGETS, "workers": 0},
    }
    kubectl("create", "-f", "-", input=json.dumps(manifest), namespace=namespace)
    kubectl(
        "patch",
        "analysisrun",
        name,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": {"phase": phase}}),
        namespace=namespace,
    )


def today_names(before: datetime, after: datetime) -> set[str]:
    return {f"daily-{before:%Y%m%d}", f"daily-{after:%Y%m%d}"}


@pytest.mark.timeout(240)
def test_cronjob_creates_the_days_run_once_and_prunes(
    helm: Path, kubectl: Kubectl, pod_runner: PodRunner, namespace: str
) -> None:
    stream = install(helm, kubectl, namespace)
    try:
        finished_run(kubectl, namespace, "daily-20250101", "Succeeded", label=True)
        finished_run(kubectl, namespace, "daily-20250102", "Failed", label=True)
        finished_run(kubectl, namespace, "daily-20250103", "Succeeded", label=True)
        finished_run(kubectl, namespace, "daily-20250104", "Succeeded", label=True)
        finished_run(kubectl, namespace, "daily-20250105", "Running", label=True)
        finished_run(kubectl, namespace, "daily-20241231", "Succeeded", label=False)

        before = datetime.now(UTC)
        kubectl("create", "job", "--from", f"cronjob/{CRONJOB}", "first", namespace=namespace)
        wait_job_complete(kubectl, namespace, "first", pod_log=pod_runner.log_path)
        after = datetime.now(UTC)

        found = runs(kubectl, namespace)
        (today,) = set(found) & today_names(before, after)
        run = found[today]
        assert run["metadata"]["labels"]["analysisq.io/trigger"] == "daily"
        day = datetime.strptime(today.removeprefix("daily-"), "%Y%m%d").date()
        assert run["metadata"]["annotations"]["analysisq.io/run-date"] == day.isoformat()
        assert run["spec"]["targets"][0]["name"] == "echo"
        assert run["spec"]["workers"] == 20  # from the template
        assert run["spec"]["maxFailedRatio"] == 0.01  # a CRD default, applied by the server
        deadline = datetime.fromisoformat(run["spec"]["deadline"].replace("Z", "+00:00"))
        assert before + timedelta(hours=6) - timedelta(seconds=2) <= deadline
        assert deadline <= after + timedelta(hours=6)
        # keep=2: the two newest finished runs of the trigger stay; running, brand-new and
        # unlabelled runs are never pruned.
        assert set(found) == {
            today,
            "daily-20250103",
            "daily-20250104",
            "daily-20250105",
            "daily-20241231",
        }

        kubectl("create", "job", "--from", f"cronjob/{CRONJOB}", "second", namespace=namespace)
        wait_job_complete(kubectl, namespace, "second", pod_log=pod_runner.log_path)
        again = runs(kubectl, namespace)
        assert set(again) == set(found)
        assert again[today]["metadata"]["uid"] == run["metadata"]["uid"], "recreated"
        log = next(
            pod_runner.log_path(namespace, pod["metadata"]["name"])
            for pod in json.loads(
                kubectl(
                    "get", "pods", "-l", "job-name=second", "-o", "json", namespace=namespace
                ).stdout
            )["items"]
        ).read_text()
        assert "already exists" in log
    finally:
        delete_stream(kubectl, stream)


@pytest.mark.timeout(240)
def test_the_schedule_fires_through_the_controller_manager(
    helm: Path, kubectl: Kubectl, pod_runner: PodRunner, namespace: str
) -> None:
    # Every minute instead of 02:00, so the cronjob controller itself makes the Job.
    stream = install(helm, kubectl, namespace, "trigger.schedule=* * * * *")
    try:

        def scheduled_job() -> str:
            jobs = json.loads(kubectl("get", "jobs", "-o", "json", namespace=namespace).stdout)
            owned = [
                job["metadata"]["name"]
                for job in jobs["items"]
                if any(o["kind"] == "CronJob" for o in job["metadata"].get("ownerReferences", []))
            ]
            assert owned, "the cronjob controller has not created a Job yet"
            return str(owned[0])

        job = eventually(scheduled_job, timeout=100, interval=1.0)
        wait_job_complete(kubectl, namespace, job, pod_log=pod_runner.log_path)
        assert [n for n in runs(kubectl, namespace) if n.startswith("daily-")]

        def recorded() -> None:
            cron = json.loads(
                kubectl("get", "cronjob", CRONJOB, "-o", "json", namespace=namespace).stdout
            )
            assert cron["status"].get("lastSuccessfulTime"), cron["status"]

        eventually(recorded, timeout=30)
    finally:
        kubectl("patch", "cronjob", CRONJOB, "-p", '{"spec":{"suspend":true}}', namespace=namespace)
        delete_stream(kubectl, stream)


def trigger_cli(control_plane: ControlPlane, *args: str) -> subprocess.CompletedProcess[str]:
    """``analysisq trigger`` from this venv with the admin kubeconfig."""
    env = {**os.environ, "KUBECONFIG": str(control_plane.kubeconfig)}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    analysisq = Path(sys.executable).parent / "analysisq"
    return subprocess.run(
        [str(analysisq), "--log-format", "text", "trigger", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


@pytest.mark.timeout(120)
def test_command_backfills_and_explains_failures(
    helm: Path, kubectl: Kubectl, control_plane: ControlPlane, namespace: str
) -> None:
    stream = install(helm, kubectl, namespace)
    common = ["--namespace", namespace, "--template-configmap", TEMPLATE]
    try:
        backfill = trigger_cli(control_plane, *common, "--date", "2024-02-29", "--no-prune")
        assert backfill.returncode == 0, backfill.stderr
        assert f"analysisrun {namespace}/daily-20240229 created" in backfill.stdout
        assert "daily-20240229" in runs(kubectl, namespace)

        twice = trigger_cli(control_plane, *common, "--date", "2024-02-29", "--no-prune")
        assert twice.returncode == 0, twice.stderr
        assert "already exists; nothing created" in twice.stdout

        other = trigger_cli(control_plane, *common, "--prefix", "weekly", "--date", "2024-03-01")
        assert other.returncode == 0, other.stderr
        assert runs(kubectl, namespace)["weekly-20240301"]["metadata"]["labels"] == {
            "app.kubernetes.io/managed-by": "analysisq-trigger",
            "app.kubernetes.io/name": "analysisq",
            "analysisq.io/trigger": "weekly",
        }

        missing = trigger_cli(
            control_plane, "--namespace", namespace, "--template-configmap", "nope"
        )
        assert missing.returncode == 2
        assert f"the run template ConfigMap {namespace}/nope does not exist" in missing.stderr

        wrong_key = trigger_cli(control_plane, *common, "--template-key", "other.yaml")
        assert wrong_key.returncode == 2
        assert "has no key 'other.yaml' (it has: spec.yaml)" in wrong_key.stderr

        kubectl(
            "create",
            "configmap",
            "broken",
            "--from-literal=spec.yaml=targets: []",
            namespace=namespace,
        )
        broken = trigger_cli(
            control_plane, "--namespace", namespace, "--template-configmap", "broken"
        )
        assert broken.returncode == 2
        assert f"invalid run template ConfigMap {namespace}/broken" in broken.stderr
        assert "targets" in broken.stderr
        assert "Traceback" not in broken.stderr
    finally:
        delete_stream(kubectl, stream)

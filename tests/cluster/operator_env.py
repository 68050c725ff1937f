"""What the operator's cluster tests share (``tests/cluster/test_operator*.py``).

Test modules import the fixtures by their function names (``operators_fixture``, ...) and
request them by their fixture names (``operators``, ``fake_providers``, ``analysisrun_crd``).

The operator runs as production runs it: the ``analysisq operator`` command in its own
process (killable with SIGKILL), configured by environment, talking to the real API server
with a kubeconfig. Its worker pods are run by the session's pod runner as local
``analysisq worker`` processes that reach the test's PostgreSQL over 127.0.0.1. The fake
provider runs as ``analysisq fake-provider`` in its own process too. Helpers here seed
prompts, read the queue, create Secrets and wait on AnalysisRun status.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest
import yaml

from controlplane.fixtures import Kubectl, eventually
from controlplane.harness import ControlPlane, free_port
from controlplane.podrunner import PodRunner
from controlplane.processes import Child, rss_bytes
from failures import FAILED_KEY
from tools.cluster import apply_analysisrun_crd

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[2]
ANALYSISQ = str(Path(sys.executable).with_name("analysisq"))

# --- the database ----------------------------------------------------------------------------


def sql(url: str, query: str, *args: Any) -> list[asyncpg.Record]:
    """Run one statement on a fresh connection (tests are synchronous)."""

    async def go() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(url)
        try:
            return list(await conn.fetch(query, *args))
        finally:
            await conn.close()

    return asyncio.run(go())


def seed_prompts(url: str, n: int, tag: str = "t", prefix: str = "p") -> None:
    sql(
        url,
        "INSERT INTO prompts (external_id, text, tags)"
        " SELECT $2 || i, 'analyse prompt ' || $2 || i, ARRAY[$3]"
        " FROM generate_series(1, $1) AS i",
        n,
        prefix,
        tag,
    )


def queue_counts(url: str, run_id: str) -> dict[str, int]:
    rows = sql(
        url,
        "SELECT status, count(*) AS n FROM analysis_queue WHERE run_id = $1 GROUP BY status",
        run_id,
    )
    return {r["status"]: r["n"] for r in rows}


def assert_exactly_once(url: str, run_id: str, expected_items: int) -> None:
    """Every item terminal and completed once: one result per completed item, no extras."""
    (row,) = sql(
        url,
        """
        SELECT count(*) AS items,
               count(DISTINCT (prompt_tracking_id, target)) AS distinct_items,
               count(*) FILTER (WHERE status = 'completed') AS completed,
               count(*) FILTER (WHERE status NOT IN ('completed', 'failed')) AS open,
               (SELECT count(*) FROM analysis_results r WHERE r.run_id = $1) AS results,
               (SELECT count(DISTINCT queue_id) FROM analysis_results r WHERE r.run_id = $1)
                   AS distinct_results
        FROM analysis_queue WHERE run_id = $1
        """,
        run_id,
    )
    assert row["items"] == expected_items, dict(row)
    assert row["distinct_items"] == expected_items, dict(row)
    assert row["open"] == 0, dict(row)
    assert row["results"] == row["distinct_results"] == row["completed"], dict(row)


# --- Kubernetes objects ----------------------------------------------------------------------


def apply(kubectl: Kubectl, namespace: str, manifest: dict[str, Any]) -> None:
    kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest), namespace=namespace)


def secret(kubectl: Kubectl, namespace: str, name: str, data: dict[str, str]) -> None:
    literals = [f"--from-literal={k}={v}" for k, v in data.items()]
    manifest = kubectl(
        "create", "secret", "generic", name, *literals, "--dry-run=client", "-o", "yaml",
        namespace=namespace,
    ).stdout  # fmt: skip
    kubectl("apply", "-f", "-", input=manifest, namespace=namespace)


def analysis_run(name: str, **spec: Any) -> dict[str, Any]:
    body = {"targets": [{"name": "echo", "provider": "echo", "model": "echo-1"}], **spec}
    return {
        "apiVersion": "analysisq.io/v1alpha1",
        "kind": "AnalysisRun",
        "metadata": {"name": name},
        "spec": body,
    }


def get_run(kubectl: Kubectl, namespace: str, name: str) -> dict[str, Any]:
    out = kubectl("get", "analysisrun", name, "-o", "json", namespace=namespace).stdout
    result: dict[str, Any] = json.loads(out)
    return result


def condition(run: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for cond in (run.get("status") or {}).get("conditions") or []:
        if cond["type"] == kind:
            return dict(cond)
    return None


def get_deployment(kubectl: Kubectl, namespace: str, name: str) -> dict[str, Any] | None:
    result = kubectl("get", "deployment", name, "-o", "json", namespace=namespace, check=False)
    if result.returncode != 0:
        assert "NotFound" in result.stderr, result.stderr
        return None
    deployment: dict[str, Any] = json.loads(result.stdout)
    return deployment


def events(kubectl: Kubectl, namespace: str, name: str) -> list[dict[str, Any]]:
    out = kubectl(
        "get", "events", "-o", "json",
        f"--field-selector=involvedObject.kind=AnalysisRun,involvedObject.name={name}",
        namespace=namespace,
    ).stdout  # fmt: skip
    items: list[dict[str, Any]] = json.loads(out)["items"]
    return items


def wait_for(check: Callable[[], T], timeout: float = 60.0, interval: float = 0.25) -> T:
    """Call *check* until it neither fails an assertion, misses a key, nor returns False."""

    def strict() -> T:
        try:
            result = check()
        except KeyError as exc:
            raise AssertionError(f"missing {exc}") from None
        assert result is not False, "the condition is still false"
        return result

    return eventually(strict, timeout=timeout, interval=interval)


def wait_complete(kubectl: Kubectl, namespace: str, name: str, timeout: int = 180) -> None:
    kubectl("wait", "--for=condition=Complete", f"analysisrun/{name}", f"--timeout={timeout}s",
            namespace=namespace, timeout=timeout + 10)  # fmt: skip


def delete_runs(kubectl: Kubectl, namespace: str) -> None:
    """Delete every AnalysisRun of the namespace while the operator still runs (finalizers);
    strip what is left so that namespace deletion never hangs on a stopped operator."""
    kubectl("delete", "analysisruns", "--all", "--wait=false", namespace=namespace, check=False)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        out = kubectl("get", "analysisruns", "-o", "name", namespace=namespace, check=False)
        if not out.stdout.strip():
            return
        time.sleep(0.5)
    for name in out.stdout.split():
        kubectl(
            "patch", name, "--type=merge", "-p", '{"metadata":{"finalizers":null}}',
            namespace=namespace, check=False,
        )  # fmt: skip


# --- processes ---------------------------------------------------------------------------


def _get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


class OperatorProcess:
    """``analysisq operator`` in its own process; start, stop (SIGTERM), kill (SIGKILL)."""

    def __init__(
        self,
        kubeconfig: Path,
        database_url: str,
        namespaces: list[str],
        workdir: Path,
        *,
        reconcile_seconds: float = 1.0,
        stuck_reset_seconds: float = 5.0,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.health_port = free_port()
        self.metrics_port = free_port()
        self.env = {
            "PATH": os.environ["PATH"],
            "HOME": str(workdir),
            "KUBECONFIG": str(kubeconfig),
            "DATABASE_URL": database_url,
            "ANALYSISQ_NAMESPACES": ",".join(namespaces),
            "ANALYSISQ_RECONCILE_SECONDS": str(reconcile_seconds),
            "ANALYSISQ_STUCK_RESET_SECONDS": str(stuck_reset_seconds),
            "ANALYSISQ_HEALTH_PORT": str(self.health_port),
            "ANALYSISQ_METRICS_PORT": str(self.metrics_port),
            "ANALYSISQ_WORKER_IMAGE": "analysisq:test",
            "ANALYSISQ_WORKER_GRACE_SECONDS": "15",
            **(extra_env or {}),
        }
        self.child: Child | None = None
        self.starts = 0

    @property
    def log_path(self) -> Path:
        return self.workdir / "operator.log"

    def start(self, timeout: float = 60.0) -> None:
        self.starts += 1
        with self.log_path.open("a") as log:
            log.write(f"--- start {self.starts}\n")
        self.child = Child(
            "operator",
            [ANALYSISQ, "--log-format", "json", "operator"],
            self.log_path,
            env=self.env,
            cwd=self.workdir,
        )
        deadline = time.monotonic() + timeout
        while _get(f"http://127.0.0.1:{self.health_port}/healthz")[0] != 200:
            if not self.child.alive():
                raise AssertionError(f"the operator exited:\n{self.child.log_tail(60)}")
            if time.monotonic() > deadline:
                raise AssertionError(f"the operator did not start:\n{self.child.log_tail(60)}")
            time.sleep(0.2)

    def stop(self) -> int | None:
        if self.child is None:
            return None
        code = self.child.stop(grace=20.0, sig=signal.SIGTERM)
        self.child = None
        return code

    def kill(self) -> None:
        assert self.child is not None
        self.child.kill_group(signal.SIGKILL)
        self.child.release()
        self.child = None

    @property
    def pid(self) -> int:
        assert self.child is not None
        return self.child.pid

    def rss_bytes(self) -> int:
        return rss_bytes(self.pid)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> str:
        status, body = _get(f"http://127.0.0.1:{self.metrics_port}/metrics")
        assert status == 200, status
        return body

    def health(self) -> tuple[int, str]:
        return _get(f"http://127.0.0.1:{self.health_port}/healthz", timeout=10)


class FakeProviderProcess:
    """``analysisq fake-provider`` in its own process; ``url`` ends in /v1."""

    def __init__(self, workdir: Path, *flags: str) -> None:
        self.port = free_port()
        self.child = Child(
            "fake-provider",
            [ANALYSISQ, "fake-provider", "--port", str(self.port), *flags],
            workdir / f"fake-provider-{self.port}.log",
            env={"PATH": os.environ["PATH"], "HOME": str(workdir)},
            cwd=workdir,
        )
        deadline = time.monotonic() + 30
        while self.stats_or_none() is None:
            if not self.child.alive() or time.monotonic() > deadline:
                raise AssertionError(f"the fake provider did not start:\n{self.child.log_tail()}")
            time.sleep(0.1)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stats_or_none(self) -> dict[str, Any] | None:
        status, body = _get(f"http://127.0.0.1:{self.port}/stats")
        return json.loads(body) if status == 200 else None

    def stats(self) -> dict[str, Any]:
        stats = self.stats_or_none()
        assert stats is not None
        return stats

    def configure(self, **patch: Any) -> None:
        """Change the running provider's behaviour (``POST /config``, a partial FakeConfig)."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/config",
            data=json.dumps(patch).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200

    def stop(self) -> None:
        self.child.stop(grace=5.0)


# --- fixtures (import them into a test module by name) ------------------------------------


@pytest.fixture(scope="session", name="analysisrun_crd")
def analysisrun_crd_fixture(control_plane: ControlPlane, kubectl: Kubectl) -> str:
    """The AnalysisRun CRD from crds/, installed and established (the chart tests' helper)."""
    apply_analysisrun_crd(kubectl)
    return "analysisruns.analysisq.io"


def make_namespace(kubectl: Kubectl, prefix: str) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    kubectl("create", "namespace", name)
    kubectl("label", "namespace", name, "analysisq.io/test=true")

    def has_default_account() -> None:
        found = kubectl("get", "serviceaccount", "default", namespace=name, check=False)
        assert found.returncode == 0, "no default service account yet"

    wait_for(has_default_account, timeout=30)
    return name


def drop_namespace(kubectl: Kubectl, name: str) -> None:
    kubectl("delete", "namespace", name, "--wait=true", "--timeout=120s", check=False)


class OperatorFactory:
    """Starts operators for a test and cleans up after it (runs first, then the process)."""

    def __init__(
        self, control_plane: ControlPlane, kubectl: Kubectl, workdir: Path, database_url: str
    ) -> None:
        self.control_plane = control_plane
        self.kubectl = kubectl
        self.workdir = workdir
        self.database_url = database_url
        self.started: list[tuple[OperatorProcess, list[str]]] = []

    def __call__(
        self, namespaces: list[str], *, database_url: str | None = None, **kw: Any
    ) -> OperatorProcess:
        """An operator watching *namespaces*, each given the default database Secret."""
        url = database_url or self.database_url
        for ns in namespaces:
            secret(self.kubectl, ns, "analysisq-database", {"url": url})
        workdir = self.workdir / f"operator-{len(self.started)}"
        workdir.mkdir(parents=True, exist_ok=True)
        op = OperatorProcess(self.control_plane.kubeconfig, url, namespaces, workdir, **kw)
        op.start()
        self.started.append((op, namespaces))
        return op

    def close(self) -> None:
        for op, namespaces in reversed(self.started):
            if op.child is None:
                op.start()
            for ns in namespaces:
                delete_runs(self.kubectl, ns)
            op.stop()


@pytest.fixture(name="operators")
def operators_fixture(
    control_plane: ControlPlane,
    kubectl: Kubectl,
    analysisrun_crd: str,
    pod_runner: PodRunner,
    db_url: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> Iterator[OperatorFactory]:
    """Start ``analysisq operator`` processes on the test's database: ``operators([ns])``.

    When the test failed, the operators' warnings and errors are printed into its report.
    """
    factory = OperatorFactory(control_plane, kubectl, tmp_path, db_url)
    try:
        yield factory
    finally:
        if request.node.stash.get(FAILED_KEY, False):
            for log_file in sorted(tmp_path.glob("operator-*/operator.log")):
                print(f"--- warnings and errors of {log_file.parent.name}")
                print("\n".join(_complaints(log_file)[-40:]))
        factory.close()


def _complaints(log_file: Path) -> list[str]:
    lines = log_file.read_text(errors="replace").splitlines()
    return [line[:600] for line in lines if '"level": "info"' not in line]


class FakeProviders:
    """Starts fake providers for a test (``fake_providers("--latency-ms", "100")``)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[FakeProviderProcess] = []

    def __call__(self, *flags: str) -> FakeProviderProcess:
        provider = FakeProviderProcess(self.workdir, *flags)
        self.started.append(provider)
        return provider

    def close(self) -> None:
        for provider in self.started:
            provider.stop()


@pytest.fixture(name="fake_providers")
def fake_providers_fixture(tmp_path: Path) -> Iterator[FakeProviders]:
    providers = FakeProviders(tmp_path)
    try:
        yield providers
    finally:
        providers.close()

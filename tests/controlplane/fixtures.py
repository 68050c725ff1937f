"""Pytest fixtures for tests against the real control plane (the ``cluster`` tier and up).

``control_plane`` (session) starts etcd, kube-apiserver and kube-controller-manager once;
``pod_runner`` (session) adds the node that runs pods as local processes; ``namespace``
(function) gives each test a fresh namespace and deletes it afterwards; ``kubectl`` (session)
runs the built kubectl against the cluster; ``kube_api`` (session) is an admin
``kubernetes.client.ApiClient``. When the control plane cannot be built or started the fixture
fails with the reason: a cluster test never skips. Import these names into a ``conftest.py``
(see ``tests/cluster/conftest.py``) or register this module with ``pytest_plugins``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import pytest
from kubernetes import client

from controlplane import processes
from controlplane.harness import ControlPlane, ControlPlaneError, resolve_bin_dir
from controlplane.kubeapi import api_client, raw
from controlplane.podrunner import PodRunner
from controlplane.processes import Reaper

T = TypeVar("T")


class KubectlError(subprocess.CalledProcessError):
    """kubectl exited non-zero; the message carries its stderr."""

    def __str__(self) -> str:
        return f"{' '.join(map(str, self.cmd))} exited with {self.returncode}:\n{self.stderr}"


class Kubectl:
    """Runs the control plane's kubectl with the admin kubeconfig.

    ``kubectl("get", "pods", namespace=ns)`` returns the ``CompletedProcess`` (text output) and
    raises :class:`KubectlError` on a non-zero exit unless ``check=False``.
    """

    def __init__(self, binary: Path, kubeconfig: Path) -> None:
        self.binary = binary
        self.kubeconfig = kubeconfig

    def argv(self, args: tuple[str, ...], namespace: str | None) -> list[str]:
        argv = [str(self.binary), f"--kubeconfig={self.kubeconfig}"]
        if namespace is not None:
            argv.append(f"--namespace={namespace}")
        return argv + list(args)

    def __call__(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        namespace: str | None = None,
        timeout: float | None = None,
    ) -> subprocess.CompletedProcess[str]:
        argv = self.argv(args, namespace)
        result = processes.run(argv, input=input, timeout=timeout or _process_timeout(args))
        if check and result.returncode != 0:
            raise KubectlError(result.returncode, argv, result.stdout, result.stderr)
        return result

    async def run_async(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        namespace: str | None = None,
        timeout: float | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """The same, without blocking the event loop (for async tests running kopf)."""
        argv = self.argv(args, namespace)
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        reaper = Reaper.shared()
        reaper.register(proc.pid)
        try:
            out, err = await asyncio.wait_for(
                proc.communicate(input.encode() if input is not None else None),
                timeout or _process_timeout(args),
            )
        except BaseException:
            proc.kill()
            await proc.wait()
            raise
        finally:
            reaper.unregister(proc.pid)
        result = subprocess.CompletedProcess(argv, proc.returncode or 0, out.decode(), err.decode())
        if check and result.returncode != 0:
            raise KubectlError(result.returncode, argv, result.stdout, result.stderr)
        return result


def _process_timeout(args: tuple[str, ...]) -> float:
    """60 s for a kubectl call, or longer than the ``--timeout=`` it was given (``wait``):
    the process must not be killed before kubectl says what it waited for."""
    for arg in args:
        if arg.startswith("--timeout=") and arg.endswith("s") and arg[10:-1].isdigit():
            return max(60.0, int(arg[10:-1]) + 30.0)
    return 60.0


def eventually(check: Callable[[], T], timeout: float = 30.0, interval: float = 0.2) -> T:
    """Call ``check`` until it returns without raising AssertionError; return its result.

    After ``timeout`` seconds the last AssertionError propagates, so the failure says what was
    still wrong.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        time.sleep(interval)


# One control plane and one pod runner per process, even if several conftest files import
# these fixtures (each import is a separate fixture definition to pytest).
_shared_lock = threading.Lock()
_shared: dict[str, Any] = {}
_users: dict[str, int] = {}


def _acquire(key: str, make: Callable[[], T]) -> T:
    with _shared_lock:
        if key not in _shared:
            _shared[key] = make()
        _users[key] = _users.get(key, 0) + 1
        value: T = _shared[key]
        return value


def _release(key: str, close: Callable[[Any], None]) -> None:
    with _shared_lock:
        _users[key] -= 1
        if _users[key]:
            return
        value = _shared.pop(key)
    close(value)


def _start_control_plane() -> ControlPlane:
    try:
        plane = ControlPlane(resolve_bin_dir())
        plane.start()
    except ControlPlaneError as exc:
        reason = str(exc)
    else:
        return plane
    pytest.fail(f"the test Kubernetes control plane is unavailable: {reason}", pytrace=False)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Let SIGTERM unwind pytest like Ctrl-C does, so teardown stops the processes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@pytest.fixture(scope="session")
def control_plane(request: pytest.FixtureRequest) -> Iterator[ControlPlane]:
    """The session's running control plane (etcd, kube-apiserver, kube-controller-manager)."""
    with _sigterm_as_interrupt():
        plane = _acquire("control_plane", _start_control_plane)
        try:
            yield plane
        finally:

            def close(plane: ControlPlane) -> None:
                failed = request.session.testsfailed > 0
                plane.stop(keep_workdir=failed)
                Reaper.close_shared()
                if failed:
                    print(f"\ncontrol plane logs kept in {plane.workdir}/logs")

            _release("control_plane", close)


@pytest.fixture(scope="session")
def pod_runner(control_plane: ControlPlane) -> Iterator[PodRunner]:
    """The node that runs the cluster's pods as local processes (see controlplane.podrunner)."""

    def start() -> PodRunner:
        runner = PodRunner(control_plane.kubeconfig, workdir=control_plane.root / "pods")
        runner.start()
        return runner

    runner = _acquire("pod_runner", start)
    try:
        yield runner
    finally:
        _release("pod_runner", lambda r: r.stop())


@pytest.fixture(scope="session")
def kube_api(control_plane: ControlPlane) -> Iterator[client.ApiClient]:
    """An admin ``kubernetes.client.ApiClient`` for the control plane."""
    api = api_client(control_plane.kubeconfig)
    try:
        yield api
    finally:
        api.close()


@pytest.fixture(scope="session")
def kubectl(control_plane: ControlPlane) -> Kubectl:
    """Run kubectl: ``kubectl("apply", "-f", "-", input=yaml_text, namespace=ns)``."""
    return Kubectl(control_plane.kubectl_path, control_plane.kubeconfig)


def _namespace_name(test_name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", test_name.lower()).strip("-")[:40].strip("-")
    return f"t-{slug}-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def namespace(request: pytest.FixtureRequest, kube_api: client.ApiClient) -> Iterator[str]:
    """A fresh namespace (with its ``default`` service account) for one test, deleted after it.

    Teardown does not wait for the deletion: the namespace controller holds every deletion
    for 5 s before it starts, and the runner stops the pods in the background.
    """
    core = client.CoreV1Api(kube_api)
    name = _namespace_name(request.node.name)
    raw(
        core.create_namespace,
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": name, "labels": {"analysisq.io/test": "true"}},
        },
    )

    def has_default_account() -> None:
        assert raw(core.read_namespaced_service_account, "default", name) is not None

    # Pods are refused until the serviceaccount controller created `default`.
    eventually(has_default_account, timeout=30)
    try:
        yield name
    finally:
        raw(core.delete_namespace, name)

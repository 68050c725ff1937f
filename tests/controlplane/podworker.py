"""One pod's life on the test node, in one thread: what kubelet does for a pod.

:class:`PodWorker` binds the pod to the node, resolves the environment
(:mod:`controlplane.podenv`), runs the first container's ``command`` + ``args`` as a local
process (:class:`controlplane.processes.Child`), reports status (Pending → Running/Ready →
Succeeded/Failed, container states, restart counts), restarts by ``restartPolicy`` with
back-off, and on deletion sends SIGTERM, then SIGKILL after the grace period, then removes the
pod. :mod:`controlplane.podrunner` creates one worker per pod and feeds it watch events.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from controlplane.kubeapi import STRATEGIC_MERGE, ignoring, raw
from controlplane.podenv import POD_IP, ContainerConfigError, EnvResolver, expand
from controlplane.processes import Child

log = logging.getLogger("controlplane.podrunner")

Credentials = Literal["serviceaccount", "admin", "none"]

_TICK = 0.1
_CONFIG_RETRY = 1.0
_MIN_GRACE = 2.0  # kubelet's minimum for a forced deletion


@dataclass(frozen=True)
class PodEvent:
    """Something the runner did to a pod's process, for tests to assert on."""

    kind: Literal["started", "exited", "terminating", "killed", "removed"]
    namespace: str
    name: str
    uid: str
    pid: int | None = None
    exit_code: int | None = None
    at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class NodeContext:
    """What every pod worker shares: the node, the environment recipe and the credentials."""

    core: client.CoreV1Api
    node_name: str
    workdir: Path
    path: str
    """PATH for pod processes: the project's venv bin dir first."""
    allocatable: Mapping[str, str]
    credentials: Credentials
    admin_kubeconfig: Path
    server: str
    ca_data: str
    backoff_initial: float
    backoff_max: float
    default_command: tuple[str, ...] | None
    stop_grace: float
    """Grace period for processes when the runner itself stops."""
    record: Callable[[PodEvent], None]


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _exit_code(returncode: int) -> int:
    """A signal death as a container runtime reports it (SIGKILL → 137)."""
    return returncode if returncode >= 0 else 128 - returncode


class PodWorker:
    """Runs one pod; see the module docstring. Thread-safe entry points: :meth:`update`,
    :meth:`gone`, :meth:`shutdown`, :attr:`pid`."""

    def __init__(
        self, node: NodeContext, pod: dict[str, Any], on_done: Callable[[PodWorker], None]
    ) -> None:
        meta = pod["metadata"]
        self.namespace: str = meta["namespace"]
        self.name: str = meta["name"]
        self.uid: str = meta["uid"]
        self._thread = threading.Thread(
            target=self._run, name=f"pod {self.namespace}/{self.name}", daemon=True
        )
        self._node = node
        self._core = node.core
        self._pod = pod
        self._on_done = on_done
        self._wake = threading.Event()
        self._gone = False
        self._shutdown = False
        self._shutdown_at = 0.0
        self.dir = node.workdir / "pods" / f"{self.namespace}_{self.name}_{self.uid[:8]}"
        container = pod["spec"]["containers"][0]
        self.container_name: str = container["name"]
        self.log_path = self.dir / f"{self.container_name}.log"
        self._child: Child | None = None
        self._started_at = ""
        self._restarts = 0
        self._crashes = 0
        self._next_start = 0.0
        self._waiting: tuple[str, str] | None = ("ContainerCreating", "")
        self._terminated: dict[str, Any] | None = None
        self._last_terminated: dict[str, Any] | None = None
        self._phase = "Pending"
        self._start_time = _now()
        self._transitions: dict[str, tuple[str, str]] = {}
        self._reported: dict[str, Any] | None = None
        self._deleting = False

    # --- called from other threads -------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        child = self._child
        return child.pid if child is not None and child.alive() else None

    def update(self, pod: dict[str, Any]) -> None:
        self._pod = pod
        self._wake.set()

    def gone(self) -> None:
        """The pod object no longer exists."""
        self._gone = True
        self._wake.set()

    def shutdown(self) -> None:
        """The runner stops: kill the process soon, leave the pod object alone."""
        self._shutdown_at = time.monotonic()
        self._shutdown = True
        self._wake.set()

    def kill(self) -> None:
        """Last resort when the worker thread is stuck: SIGKILL the process group now."""
        child = self._child
        if child is not None:
            child.release()

    # --- the loop ------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        try:
            self._loop()
        except Exception:
            log.exception("pod %s/%s: worker failed", self.namespace, self.name)
        finally:
            if self._child is not None:
                self._stop_process(0.0)
            self._on_done(self)

    def _loop(self) -> None:
        while True:
            if self._shutdown:
                self._stop_process(self._node.stop_grace)
                return
            pod = self._pod
            if self._gone:
                self._stop_process(_MIN_GRACE)
                return
            node_name = pod["spec"].get("nodeName")
            if node_name and node_name != self._node.node_name:
                log.info("pod %s/%s: bound to %s; not ours", self.namespace, self.name, node_name)
                return
            try:
                if pod["metadata"].get("deletionTimestamp"):
                    self._delete(pod)
                    return
                if not pod["spec"].get("nodeName"):
                    self._bind()
                else:
                    self._step(pod)
            except (ApiException, HTTPError, OSError) as exc:
                log.warning("pod %s/%s: %s; retrying", self.namespace, self.name, exc)
                self._wake.wait(1.0)
            except Exception:
                # A bug here must not orphan the process: log it and keep supervising.
                log.exception("pod %s/%s: unexpected error; retrying", self.namespace, self.name)
                self._wake.wait(1.0)
            self._wake.wait(_TICK)
            self._wake.clear()

    def _bind(self) -> None:
        body = client.V1Binding(
            metadata=client.V1ObjectMeta(name=self.name, uid=self.uid),
            target=client.V1ObjectReference(
                kind="Node", api_version="v1", name=self._node.node_name
            ),
        )
        # The client cannot decode the Status this call returns, hence raw(); a 409 means
        # someone else bound it first: read where to.
        if ignoring(
            (409,), self._core.create_namespaced_pod_binding, self.name, self.namespace, body
        ):
            self._pod["spec"]["nodeName"] = self._node.node_name
            log.info("pod %s/%s: bound to %s", self.namespace, self.name, self._node.node_name)
        elif (pod := raw(self._core.read_namespaced_pod, self.name, self.namespace)) is None:
            self._gone = True
        else:
            self._pod = pod

    def _step(self, pod: dict[str, Any]) -> None:
        if self._phase in ("Succeeded", "Failed"):
            return
        if self._child is None:
            if time.monotonic() >= self._next_start:
                self._start(pod)
        elif (code := self._child.poll()) is not None:
            self._exited(pod, code)
        self._report()

    # --- starting ------------------------------------------------------------------------------

    def _start(self, pod: dict[str, Any]) -> None:
        container = pod["spec"]["containers"][0]
        try:
            env = self._environment(pod, container)
        except ContainerConfigError as exc:
            self._waiting = ("CreateContainerConfigError", str(exc))
            self._next_start = time.monotonic() + _CONFIG_RETRY
            return
        argv = [expand(arg, env) for arg in self._argv(container)]
        if self._terminated is not None:
            self._restarts += 1
            self._last_terminated = self._terminated
        self._terminated = None
        self._started_at = _now()
        executable = shutil.which(argv[0], path=env["PATH"]) if argv else None
        if executable is None:
            message = (
                f'exec: "{argv[0]}": executable file not found in $PATH'
                if argv
                else "the container has no command and the runner has no default"
            )
            self._record_exit(pod, 128, "StartError", message, pid=None)
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            self._child = Child(
                f"pod {self.namespace}/{self.name}",
                [executable, *argv[1:]],
                self.log_path,
                env=env,
                cwd=self.dir,
            )
        except OSError as exc:
            self._record_exit(pod, 128, "StartError", f"exec: {exc}", pid=None)
            return
        self._waiting = None
        self._phase = "Running"
        self._node.record(
            PodEvent("started", self.namespace, self.name, self.uid, pid=self._child.pid)
        )
        log.info("pod %s/%s: started pid %d: %s", self.namespace, self.name, self._child.pid, argv)

    def _argv(self, container: dict[str, Any]) -> list[str]:
        command = list(container.get("command") or self._node.default_command or [])
        return command + list(container.get("args") or [])

    def _environment(self, pod: dict[str, Any], container: dict[str, Any]) -> dict[str, str]:
        env = {
            "PATH": self._node.path,
            "HOME": str(self.dir),
            "HOSTNAME": self.name,
            "LANG": os.environ.get("LANG", "C.UTF-8"),
        }
        kubeconfig = self._kubeconfig(pod)
        if kubeconfig is not None:
            env["KUBECONFIG"] = str(kubeconfig)
        env.update(EnvResolver(self._core, pod, self._node.allocatable).resolve(container))
        return env

    def _kubeconfig(self, pod: dict[str, Any]) -> Path | None:
        """Credentials for the process, as kubelet mounts a service-account token."""
        mode = self._node.credentials
        if mode == "none" or pod["spec"].get("automountServiceAccountToken") is False:
            return None
        if mode == "admin":
            return self._node.admin_kubeconfig
        account = pod["spec"].get("serviceAccountName") or "default"
        request = client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(
                audiences=[],
                expiration_seconds=24 * 3600,
                bound_object_ref=client.V1BoundObjectReference(
                    kind="Pod", api_version="v1", name=self.name, uid=self.uid
                ),
            )
        )
        try:
            token = raw(
                self._core.create_namespaced_service_account_token,
                account,
                self.namespace,
                request,
            )
        except ApiException as exc:
            raise ContainerConfigError(
                f"cannot get a token for service account {account}: {exc.reason}"
            ) from exc
        if token is None:
            raise ContainerConfigError(f'serviceaccount "{account}" not found')
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / "kubeconfig"
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "cluster",
                    "cluster": {
                        "server": self._node.server,
                        "certificate-authority-data": self._node.ca_data,
                    },
                }
            ],
            "users": [{"name": account, "user": {"token": token["status"]["token"]}}],
            "contexts": [
                {
                    "name": "pod",
                    "context": {"cluster": "cluster", "user": account, "namespace": self.namespace},
                }
            ],
            "current-context": "pod",
        }
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)
        return path

    # --- exits and restarts --------------------------------------------------------------------

    def _exited(self, pod: dict[str, Any], returncode: int) -> None:
        assert self._child is not None
        pid = self._child.pid
        self._child.release()
        self._child = None
        code = _exit_code(returncode)
        self._record_exit(pod, code, "Completed" if code == 0 else "Error", "", pid=pid)

    def _record_exit(
        self, pod: dict[str, Any], code: int, reason: str, message: str, pid: int | None
    ) -> None:
        finished = _now()
        self._terminated = {
            "exitCode": code,
            "reason": reason,
            "message": message or None,
            "startedAt": self._started_at,
            "finishedAt": finished,
            "containerID": f"local://{pid}" if pid else None,
        }
        self._node.record(
            PodEvent("exited", self.namespace, self.name, self.uid, pid=pid, exit_code=code)
        )
        log.info("pod %s/%s: pid %s exited with %d", self.namespace, self.name, pid, code)
        policy = pod["spec"].get("restartPolicy") or "Always"
        if policy == "Always" or (policy == "OnFailure" and code != 0):
            delay = self._backoff(self._started_at, finished)
            self._next_start = time.monotonic() + delay
            if delay > 0:
                self._waiting = (
                    "CrashLoopBackOff",
                    f"back-off {delay:g}s restarting failed container={self.container_name}"
                    f" pod={self.name}_{self.namespace}({self.uid})",
                )
            else:
                self._waiting = None
        else:
            self._phase = "Succeeded" if code == 0 else "Failed"
            self._waiting = None

    def _backoff(self, started: str, finished: str) -> float:
        """Kubelet's restart back-off, scaled down: immediate, then doubling up to the max;
        a run longer than the max resets it."""
        ran = (
            dt.datetime.fromisoformat(finished) - dt.datetime.fromisoformat(started)
        ).total_seconds()
        if ran > self._node.backoff_max:
            self._crashes = 0
        self._crashes += 1
        if self._crashes == 1:
            return 0.0
        return float(
            min(self._node.backoff_initial * 2 ** (self._crashes - 2), self._node.backoff_max)
        )

    # --- deletion ------------------------------------------------------------------------------

    def _stop_process(self, grace: float) -> None:
        """SIGTERM the container's main process; SIGKILL its group after ``grace`` seconds."""
        child = self._child
        if child is None:
            return
        if child.alive():
            child.send_signal(signal.SIGTERM)
            self._node.record(
                PodEvent("terminating", self.namespace, self.name, self.uid, pid=child.pid)
            )
            deadline = time.monotonic() + grace
            while child.wait(_TICK) is None:
                if self._shutdown:
                    deadline = min(deadline, self._shutdown_at + self._node.stop_grace)
                if time.monotonic() >= deadline:
                    break
            if child.poll() is None:
                self._node.record(
                    PodEvent("killed", self.namespace, self.name, self.uid, pid=child.pid)
                )
                log.info(
                    "pod %s/%s: pid %d outlived its %gs grace period; SIGKILL",
                    self.namespace,
                    self.name,
                    child.pid,
                    grace,
                )
        self._exited(self._pod, child.release())

    def _delete(self, pod: dict[str, Any]) -> None:
        """Graceful deletion: stop the process, report it, then remove the object."""
        meta = pod["metadata"]
        grace = meta.get("deletionGracePeriodSeconds")
        if grace is None:
            grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
        self._deleting = True
        self._stop_process(max(float(grace), _MIN_GRACE))
        if self._phase not in ("Succeeded", "Failed"):
            # Like kubelet, a deleted pod whose containers all stopped is terminal, whatever
            # its restart policy.
            failed = self._terminated is not None and self._terminated["exitCode"] != 0
            self._phase = "Failed" if failed else "Succeeded"
            self._waiting = None
        self._report()
        options = client.V1DeleteOptions(
            grace_period_seconds=0, preconditions=client.V1Preconditions(uid=self.uid)
        )
        ignoring(
            (404, 409),
            self._core.delete_namespaced_pod,
            self.name,
            self.namespace,
            grace_period_seconds=0,
            body=options,
        )
        self._node.record(PodEvent("removed", self.namespace, self.name, self.uid))
        log.info("pod %s/%s: removed", self.namespace, self.name)

    # --- status --------------------------------------------------------------------------------

    def _condition(self, kind: str, ok: bool, reason: str | None = None) -> dict[str, Any]:
        status = "True" if ok else "False"
        previous = self._transitions.get(kind)
        if previous is None or previous[0] != status:
            self._transitions[kind] = (status, _now())
        return {
            "type": kind,
            "status": status,
            "reason": None if ok else reason,
            "lastProbeTime": None,
            "lastTransitionTime": self._transitions[kind][1],
        }

    def _container_status(self) -> dict[str, Any]:
        child = self._child
        running = child is not None and child.alive() and not self._deleting
        state: dict[str, Any] = {"running": None, "waiting": None, "terminated": None}
        if child is not None and child.alive():
            state["running"] = {"startedAt": self._started_at}
        elif self._waiting is not None:
            reason, message = self._waiting
            state["waiting"] = {"reason": reason, "message": message or None}
        elif self._terminated is not None:
            state["terminated"] = self._terminated
        last = {"running": None, "waiting": None, "terminated": self._last_terminated}
        container = self._pod["spec"]["containers"][0]
        return {
            "name": self.container_name,
            "image": container.get("image") or "",
            "imageID": "",
            "containerID": f"local://{child.pid}" if child is not None else None,
            "ready": running,
            "started": child is not None and child.alive(),
            "restartCount": self._restarts,
            "state": state,
            "lastState": last,
        }

    def _report(self) -> None:
        """Patch the pod status when it changed since the last report."""
        container = self._container_status()
        ready = bool(container["ready"])
        done = self._phase in ("Succeeded", "Failed")
        reason = "PodCompleted" if done else "ContainersNotReady"
        status = {
            "phase": self._phase,
            "hostIP": POD_IP,
            "hostIPs": [{"ip": POD_IP}],
            "podIP": POD_IP,
            "podIPs": [{"ip": POD_IP}],
            "startTime": self._start_time,
            "conditions": [
                self._condition("PodReadyToStartContainers", True),
                self._condition("Initialized", True),
                self._condition("ContainersReady", ready, reason),
                self._condition("Ready", ready, reason),
            ],
            "containerStatuses": [container],
        }
        if status == self._reported:
            return
        if not ignoring(
            (404,),
            self._core.patch_namespaced_pod_status,
            self.name,
            self.namespace,
            {"status": status},
            _content_type=STRATEGIC_MERGE,
        ):
            self._gone = True
        self._reported = status

"""The test-only "kubelet": a Node whose pods run as local processes.

:class:`PodRunner` registers a Ready Node, lists and watches pods (all namespaces, or the
configured namespaces and label selector), and hands every pod that is unscheduled or bound to
its node to a :class:`controlplane.podworker.PodWorker` thread, which binds it, runs its first
container's command from the project's virtualenv, reports its status and honours restart
policy and graceful deletion. Tests find a pod's process with :meth:`PodRunner.pid_of` and
what happened to it in :attr:`PodRunner.events`. Stopping the runner kills every process.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import platform
import shutil
import sysconfig
import tempfile
import threading
import time
from collections.abc import Collection, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines
from urllib3.exceptions import HTTPError

from controlplane.kubeapi import MERGE, STRATEGIC_MERGE, api_client, ignoring, raw
from controlplane.podenv import POD_IP
from controlplane.podworker import Credentials, NodeContext, PodEvent, PodWorker

log = logging.getLogger("controlplane.podrunner")

_WATCH_SECONDS = 240


def _memory_capacity() -> str:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                return f"{line.split()[1]}Ki"
    return "8Gi"


def venv_bin_dir() -> Path:
    """The bin dir of the Python environment running this code (the project's venv)."""
    return Path(sysconfig.get_path("scripts"))


class PodRunner:
    """Runs the pods of a node as local processes; use :meth:`start`/:meth:`stop` or ``with``.

    ``credentials`` decides what a pod's process gets in ``KUBECONFIG``: ``"serviceaccount"``
    (a token for the pod's service account, bound to the pod, so RBAC applies as in a real
    cluster), ``"admin"`` (the admin kubeconfig) or ``"none"``.
    """

    def __init__(
        self,
        kubeconfig: Path,
        *,
        workdir: Path | None = None,
        node_name: str = "analysisq-test-node",
        namespaces: Collection[str] | None = None,
        label_selector: str | None = None,
        credentials: Credentials = "serviceaccount",
        path_prefix: Sequence[Path] | None = None,
        default_command: Sequence[str] | None = None,
        backoff_initial: float = 1.0,
        backoff_max: float = 10.0,
        stop_grace: float = 5.0,
        keep_workdir: bool = False,
    ) -> None:
        self.kubeconfig = kubeconfig
        self.node_name = node_name
        self.namespaces = frozenset(namespaces) if namespaces is not None else None
        self.label_selector = label_selector
        self._credentials: Credentials = credentials
        self._path_prefix = list(path_prefix) if path_prefix is not None else [venv_bin_dir()]
        self._default_command = tuple(default_command) if default_command else None
        self._backoff = (backoff_initial, backoff_max)
        self._stop_grace = stop_grace
        self._own_workdir = workdir is None
        self.keep_workdir = keep_workdir
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="analysisq-pods-"))
        self.events: list[PodEvent] = []
        self._events_lock = threading.Lock()
        self._lock = threading.Lock()
        self._workers: dict[str, PodWorker] = {}
        self._finished: set[str] = set()
        self._stopping = threading.Event()
        self._synced = threading.Event()
        self._watch_response: Any = None
        self._thread: threading.Thread | None = None
        self._api: client.ApiClient | None = None
        self._log_handler: logging.Handler | None = None
        self._node: NodeContext | None = None

    # --- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> PodRunner:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self, timeout: float = 30.0) -> None:
        """Register the node and start watching; returns once existing pods were listed."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._log_handler = logging.FileHandler(self.workdir / "podrunner.log")
        self._log_handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(threadName)s: %(message)s")
        )
        log.addHandler(self._log_handler)
        log.setLevel(logging.INFO)
        try:
            self._api = api_client(self.kubeconfig)
            core = client.CoreV1Api(self._api)
            self._node = self._node_context(core)
            self._register_node(core)
            self._thread = threading.Thread(
                target=self._watch_loop, name="podrunner watch", daemon=True
            )
            self._thread.start()
            if not self._synced.wait(timeout):
                raise RuntimeError(f"the pod runner could not list pods within {timeout}s")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Kill every pod process (SIGTERM, SIGKILL after ``stop_grace``) and stop watching."""
        self._stopping.set()
        response = self._watch_response
        if response is not None:
            with contextlib.suppress(Exception):
                response.shutdown()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        with self._lock:
            workers = list(self._workers.values())
        for worker in workers:
            worker.shutdown()
        for worker in workers:
            worker.join(timeout=self._stop_grace + 10)
            worker.kill()
        if self._api is not None:
            self._api.close()
            self._api = None
        if self._log_handler is not None:
            log.removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None
        if self._own_workdir and not self.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # --- for tests ------------------------------------------------------------------------------

    def _worker(self, namespace: str, name: str) -> PodWorker | None:
        with self._lock:
            candidates = [
                w for w in self._workers.values() if (w.namespace, w.name) == (namespace, name)
            ]
        return candidates[-1] if candidates else None

    def pid_of(self, namespace: str, name: str) -> int | None:
        """The pid of the pod's running process, or None."""
        worker = self._worker(namespace, name)
        return worker.pid if worker is not None else None

    def wait_for_pid(self, namespace: str, name: str, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while (pid := self.pid_of(namespace, name)) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"pod {namespace}/{name} has no running process")
            time.sleep(0.1)
        return pid

    def pids(self, namespace: str | None = None) -> dict[tuple[str, str], int]:
        """Running processes, by (namespace, pod name)."""
        with self._lock:
            workers = list(self._workers.values())
        return {
            (w.namespace, w.name): pid
            for w in workers
            if (namespace is None or w.namespace == namespace) and (pid := w.pid) is not None
        }

    def log_path(self, namespace: str, name: str) -> Path:
        """The file receiving the pod's stdout and stderr (across restarts)."""
        worker = self._worker(namespace, name)
        if worker is not None:
            return worker.log_path
        matches = sorted((self.workdir / "pods").glob(f"{namespace}_{name}_*/*.log"))
        if not matches:
            raise FileNotFoundError(f"no log for pod {namespace}/{name}")
        return max(matches, key=lambda p: p.stat().st_mtime)

    def events_for(self, namespace: str, name: str | None = None) -> list[PodEvent]:
        with self._events_lock:
            return [
                e
                for e in self.events
                if e.namespace == namespace and (name is None or e.name == name)
            ]

    def _record(self, event: PodEvent) -> None:
        with self._events_lock:
            self.events.append(event)

    # --- node -----------------------------------------------------------------------------------

    def _node_context(self, core: client.CoreV1Api) -> NodeContext:
        config = yaml.safe_load(self.kubeconfig.read_text())
        cluster = config["clusters"][0]["cluster"]
        ca_data = (
            cluster.get("certificate-authority-data")
            or base64.b64encode(Path(cluster["certificate-authority"]).read_bytes()).decode()
        )
        path = os.pathsep.join(
            [str(p) for p in self._path_prefix] + [os.environ.get("PATH", os.defpath)]
        )
        return NodeContext(
            core=core,
            node_name=self.node_name,
            workdir=self.workdir,
            path=path,
            allocatable=self._capacity(),
            credentials=self._credentials,
            admin_kubeconfig=self.kubeconfig,
            server=cluster["server"],
            ca_data=ca_data,
            backoff_initial=self._backoff[0],
            backoff_max=self._backoff[1],
            default_command=self._default_command,
            stop_grace=self._stop_grace,
            record=self._record,
        )

    @staticmethod
    def _capacity() -> dict[str, str]:
        return {
            "cpu": str(os.cpu_count() or 1),
            "memory": _memory_capacity(),
            "pods": "110",
            "ephemeral-storage": "100Gi",
        }

    def _register_node(self, core: client.CoreV1Api) -> None:
        labels = {
            "kubernetes.io/hostname": self.node_name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": {"x86_64": "amd64", "aarch64": "arm64"}.get(
                platform.machine(), platform.machine()
            ),
            "analysisq.io/pod-runner": "true",
        }
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": self.node_name, "labels": labels},
        }
        ignoring((409,), core.create_node, node)
        # TaintNodesByCondition adds a not-ready taint that only the node-lifecycle controller
        # would lift; this node is ready.
        raw(core.patch_node, self.node_name, {"spec": {"taints": None}}, _content_type=MERGE)
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        capacity = self._capacity()
        status = {
            "capacity": capacity,
            "allocatable": capacity,
            "addresses": [
                {"type": "InternalIP", "address": POD_IP},
                {"type": "Hostname", "address": self.node_name},
            ],
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": "analysisq test pod runner is ready",
                    "lastHeartbeatTime": now,
                    "lastTransitionTime": now,
                }
            ],
            "nodeInfo": {
                "architecture": labels["kubernetes.io/arch"],
                "operatingSystem": "linux",
                "osImage": platform.platform(),
                "kernelVersion": platform.release(),
                "kubeletVersion": "analysisq-pod-runner",
                "kubeProxyVersion": "",
                "containerRuntimeVersion": "local-process://1",
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
            },
        }
        raw(
            core.patch_node_status,
            self.node_name,
            {"status": status},
            _content_type=STRATEGIC_MERGE,
        )

    # --- watching ---------------------------------------------------------------------------------

    def _watch_loop(self) -> None:
        assert self._node is not None
        core = self._node.core
        resource_version: str | None = None
        while not self._stopping.is_set():
            try:
                if resource_version is None:
                    resource_version = self._relist(core)
                resource_version = self._watch(core, resource_version)
            except Exception as exc:
                # Whatever goes wrong, the node must keep watching: log, back off, relist if
                # the error was not a transport one.
                if self._stopping.is_set():
                    break
                if isinstance(exc, ApiException) and exc.status == 410:
                    resource_version = None
                elif isinstance(exc, (ApiException, HTTPError, OSError)):
                    log.warning("pod watch failed (%s); retrying", exc)
                else:
                    log.exception("pod watch failed; relisting")
                    resource_version = None
                self._stopping.wait(1.0)

    def _relist(self, core: client.CoreV1Api) -> str:
        listing = raw(core.list_pod_for_all_namespaces, label_selector=self.label_selector or "")
        assert listing is not None
        present = set()
        for pod in listing["items"]:
            present.add(pod["metadata"]["uid"])
            self._dispatch("ADDED", pod)
        with self._lock:
            vanished = [w for uid, w in self._workers.items() if uid not in present]
            self._finished &= present
        for worker in vanished:
            worker.gone()
        self._synced.set()
        version: str = listing["metadata"]["resourceVersion"]
        return version

    def _watch(self, core: client.CoreV1Api, resource_version: str) -> str | None:
        """Follow one watch request; the next resourceVersion, or None to relist (410)."""
        # An undecoded urllib3 response, streamed line by line.
        response: Any = core.list_pod_for_all_namespaces(
            watch=True,
            resource_version=resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=_WATCH_SECONDS,
            label_selector=self.label_selector or "",
            _preload_content=False,
            _request_timeout=(10, _WATCH_SECONDS + 30),
        )
        self._watch_response = response
        try:
            if response.status != 200:
                raise ApiException(status=response.status, reason=response.reason)
            for line in iter_resp_lines(response):
                if self._stopping.is_set():
                    break
                if not line:
                    continue
                event = json.loads(line)
                kind, obj = event["type"], event["object"]
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        return None
                    raise ApiException(status=obj.get("code"), reason=obj.get("message"))
                resource_version = obj["metadata"]["resourceVersion"]
                if kind != "BOOKMARK":
                    self._dispatch(kind, obj)
        finally:
            self._watch_response = None
            response.close()
            response.release_conn()
        return resource_version

    def _dispatch(self, kind: str, pod: dict[str, Any]) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        if self.namespaces is not None and meta["namespace"] not in self.namespaces:
            return
        uid = meta["uid"]
        with self._lock:
            worker = self._workers.get(uid)
            if kind == "DELETED":
                self._finished.discard(uid)
                if worker is not None:
                    worker.gone()
                return
            if worker is not None:
                worker.update(pod)
                return
            if uid in self._finished or self._stopping.is_set():
                return
            if spec.get("nodeName") not in (None, "", self.node_name):
                return
            if pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
                return
            assert self._node is not None
            worker = PodWorker(self._node, pod, self._worker_done)
            self._workers[uid] = worker
        worker.start()

    def _worker_done(self, worker: PodWorker) -> None:
        # Until its DELETED event, a finished pod may linger (finalizers); do not restart it.
        with self._lock:
            self._workers.pop(worker.uid, None)
            self._finished.add(worker.uid)

"""Start and stop a real Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager).

The binaries come from ``build.sh`` (built from Go modules and cached outside the repository).
:class:`ControlPlane` generates certificates (:mod:`controlplane.certs`), starts the three
components as separate processes on free loopback ports, each logging to a file in its work
directory, waits until the API answers and the controllers work, and writes an admin
kubeconfig. Teardown is by process group, and the reaper in :mod:`controlplane.processes`
kills the processes even when the Python process dies first. Pods still need a node: that is
:mod:`controlplane.podrunner`.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import http.client
import json
import logging
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import yaml

from controlplane import certs
from controlplane.processes import Child, rss_bytes, wait_for

log = logging.getLogger(__name__)

BUILD_SCRIPT = Path(__file__).with_name("build.sh")
BIN_ENV = "ANALYSISQ_CONTROLPLANE_BIN"
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kubectl")
_WORKDIR_PREFIX = "analysisq-cp-"

CONTROLLERS = (
    "deployment-controller",
    "replicaset-controller",
    "job-controller",
    "cronjob-controller",
    "ttl-after-finished-controller",
    "garbage-collector-controller",
    "namespace-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "clusterrole-aggregation-controller",
)
"""What kube-controller-manager runs: workloads, owner garbage collection, namespace deletion,
default service accounts, legacy token secrets, and the aggregated admin/edit/view roles."""


class ControlPlaneError(RuntimeError):
    """The control plane could not be built, started or reached; the message says why."""


def built_dir(env: str, args: Sequence[str] = (), show_build: bool = False) -> Path:
    """``$env`` when set, else the bin directory ``build.sh ARGS`` prints (at once when its
    binaries are cached; a cold build takes minutes, and ``show_build`` lets its progress
    through to stderr)."""
    configured = os.environ.get(env)
    if configured:
        return Path(configured)
    log.info("%s is not set; running %s %s", env, BUILD_SCRIPT, " ".join(args))
    result = subprocess.run(
        ["bash", str(BUILD_SCRIPT), *args],
        stdout=subprocess.PIPE,
        stderr=None if show_build else subprocess.PIPE,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise ControlPlaneError(
            f"{BUILD_SCRIPT} {' '.join(args)} failed with exit code {result.returncode}:\n"
            + "\n".join((result.stderr or "(see above)").splitlines()[-40:])
        )
    return Path(result.stdout.strip().splitlines()[-1])


def resolve_bin_dir(show_build: bool = False) -> Path:
    """The directory holding the four binaries: ``$ANALYSISQ_CONTROLPLANE_BIN``, else build.sh."""
    bin_dir = built_dir(BIN_ENV, show_build=show_build)
    missing = [b for b in BINARIES if not os.access(bin_dir / b, os.X_OK)]
    if missing:
        raise ControlPlaneError(
            f"control plane binaries missing in {bin_dir}: {', '.join(missing)}"
            f" (run `bash {BUILD_SCRIPT}` or fix {BIN_ENV})"
        )
    return bin_dir


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _has_default_route() -> bool:
    try:
        with open("/proc/net/route") as routes:
            return any(line.split()[1] == "00000000" for line in list(routes)[1:])
    except (OSError, IndexError):
        return False


def prune_stale_workdirs(
    parent: Path, max_age: float = 3600.0, prefix: str = _WORKDIR_PREFIX
) -> None:
    """Remove work dirs (~130 MB of etcd WAL each, ~1 GB for a real node) left by killed or
    failed runs: older than ``max_age`` and named on no running process's command line."""
    cutoff = time.time() - max_age
    stale = [d for d in parent.glob(f"{prefix}*") if d.is_dir() and d.stat().st_mtime < cutoff]
    if not stale:
        return
    command_lines = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            command_lines.append(cmdline.read_bytes())
    for directory in stale:
        if not any(str(directory).encode() in line for line in command_lines):
            shutil.rmtree(directory, ignore_errors=True)


@dataclass
class ControlPlane:
    """A running etcd + kube-apiserver + kube-controller-manager; use :meth:`start`/:meth:`stop`
    or ``with ControlPlane(bin_dir) as cp:``."""

    bin_dir: Path
    workdir: Path | None = None
    """Where certificates, etcd data, logs and the kubeconfig go; a temp dir when None."""
    keep_workdir: bool = False
    """Leave the work dir (and its logs) on disk after :meth:`stop`."""
    start_timeout: float = 90.0
    extra_apiserver_args: list[str] = field(default_factory=list)
    bind_address: str = "127.0.0.1"
    """Where kube-apiserver listens; any other address is also advertised (the endpoint of
    the ``kubernetes`` Service) and in the serving certificate, so pods of a real node
    (:mod:`controlplane.node`) reach it."""
    extra_controllers: tuple[str, ...] = ()
    """kube-controller-manager controllers to run besides ``CONTROLLERS``."""

    api_port: int = 0
    etcd_port: int = 0
    startup_seconds: float = 0.0
    """Wall time :meth:`start` took, for reports."""
    _children: dict[str, Child] = field(default_factory=dict)
    _own_workdir: bool = False
    _ssl: ssl.SSLContext | None = None

    # --- paths --------------------------------------------------------------------------------

    @property
    def root(self) -> Path:
        if self.workdir is None:
            raise ControlPlaneError("the control plane has not been started")
        return self.workdir

    @property
    def kubeconfig(self) -> Path:
        """The admin kubeconfig (cluster-admin through ``system:masters``)."""
        return self.root / "admin.kubeconfig"

    @property
    def server(self) -> str:
        return f"https://{self.bind_address}:{self.api_port}"

    @property
    def ca_file(self) -> Path:
        return self.root / "pki" / "ca.crt"

    @property
    def kubectl_path(self) -> Path:
        return self.bin_dir / "kubectl"

    def log_path(self, component: str) -> Path:
        return self.root / "logs" / f"{component}.log"

    @property
    def pids(self) -> dict[str, int]:
        return {name: child.pid for name, child in self._children.items()}

    def rss_bytes(self) -> dict[str, int]:
        """Resident memory of each component process."""
        return {name: rss_bytes(child.pid) for name, child in self._children.items()}

    # --- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Start the three components and return once the cluster is usable.

        Raises :class:`ControlPlaneError` with the failing component's log tail on failure;
        everything already started is stopped again.
        """
        began = time.monotonic()
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix=_WORKDIR_PREFIX))
            self._own_workdir = True
            prune_stale_workdirs(self.workdir.parent)
        self.workdir.mkdir(parents=True, exist_ok=True)
        atexit.register(self.stop)
        try:
            self._write_pki()
            self._start_etcd()
            self._start_apiserver()
            self._write_kubeconfig()
            self._start_controller_manager()
            self._wait_for_controllers()
        except BaseException:
            self.stop(keep_workdir=True)
            raise
        self.startup_seconds = time.monotonic() - began
        log.info(
            "control plane up at %s in %.1f s (work dir %s)",
            self.server,
            self.startup_seconds,
            self.workdir,
        )

    def stop(self, keep_workdir: bool | None = None) -> None:
        """Stop the components (controller-manager, apiserver, then etcd); idempotent."""
        atexit.unregister(self.stop)
        for name in reversed(list(self._children)):
            child = self._children.pop(name)
            code = child.stop(grace=10.0)
            log.debug("%s exited with %s", name, code)
        keep = self.keep_workdir if keep_workdir is None else keep_workdir
        if self._own_workdir and self.workdir is not None and not keep:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # --- steps --------------------------------------------------------------------------------

    def _write_pki(self) -> None:
        pki = self.root / "pki"
        pki.mkdir(exist_ok=True)
        generated = certs.generate(extra_ips=(self.bind_address,))
        generated.ca.write(pki / "ca.crt", pki / "ca.key")
        generated.serving.write(pki / "apiserver.crt", pki / "apiserver.key")
        generated.admin.write(pki / "admin.crt", pki / "admin.key")
        generated.service_account.write(pki / "sa.pub", pki / "sa.key")
        context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        context.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
        self._ssl = context

    def _spawn(self, name: str, argv: list[str]) -> Child:
        child = Child(name, argv, self.log_path(name), cwd=self.root)
        self._children[name] = child
        return child

    def _wait(self, what: str, check: Callable[[], bool], timeout: float | None = None) -> None:
        """Poll ``check()`` until true; fail early, with the log, when a component died."""
        wait_for(what, check, self._children.values(), timeout or self.start_timeout,
                 ControlPlaneError)  # fmt: skip

    def _start_etcd(self) -> None:
        self.etcd_port, peer_port = free_port(), free_port()
        client_url = f"http://127.0.0.1:{self.etcd_port}"
        peer_url = f"http://127.0.0.1:{peer_port}"
        self._spawn(
            "etcd",
            [
                str(self.bin_dir / "etcd"),
                "--name=default",
                f"--data-dir={self.root / 'etcd'}",
                f"--listen-client-urls={client_url}",
                f"--advertise-client-urls={client_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=default={peer_url}",
                "--unsafe-no-fsync=true",
                "--log-level=warn",
            ],
        )
        self._wait("etcd /health", lambda: self._etcd_healthy(client_url), timeout=30)

    def _etcd_healthy(self, client_url: str) -> bool:
        status, body = _get(client_url + "/health", None)
        return status == 200 and json.loads(body).get("health") == "true"

    def _start_apiserver(self) -> None:
        self.api_port = free_port()
        pki = self.root / "pki"
        args = [
            str(self.bin_dir / "kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
            f"--cert-dir={pki}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--secure-port={self.api_port}",
            f"--bind-address={self.bind_address}",
            "--service-cluster-ip-range=10.0.0.0/24",
            "--authorization-mode=RBAC",
            "--allow-privileged=true",
            f"--client-ca-file={pki / 'ca.crt'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--profiling=false",
            *self.extra_apiserver_args,
        ]
        if self.bind_address != "127.0.0.1":
            args.append(f"--advertise-address={self.bind_address}")
        elif not _has_default_route():
            # Without a default route the apiserver cannot pick an address to advertise.
            args.append("--advertise-address=10.0.0.1")
        self._spawn("kube-apiserver", args)
        self._wait("kube-apiserver /readyz", lambda: self._api_get("/readyz")[0] == 200)

    def _write_kubeconfig(self) -> None:
        pki = self.root / "pki"

        def b64(path: Path) -> str:
            return base64.b64encode(path.read_bytes()).decode()

        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "analysisq-test",
                    "cluster": {
                        "server": self.server,
                        "certificate-authority-data": b64(pki / "ca.crt"),
                    },
                }
            ],
            "users": [
                {
                    "name": "admin",
                    "user": {
                        "client-certificate-data": b64(pki / "admin.crt"),
                        "client-key-data": b64(pki / "admin.key"),
                    },
                }
            ],
            "contexts": [
                {
                    "name": "analysisq-test",
                    "context": {"cluster": "analysisq-test", "user": "admin"},
                }
            ],
            "current-context": "analysisq-test",
        }
        self.kubeconfig.write_text(yaml.safe_dump(config, sort_keys=False))
        self.kubeconfig.chmod(0o600)

    def _start_controller_manager(self) -> None:
        pki = self.root / "pki"
        self._spawn(
            "kube-controller-manager",
            [
                str(self.bin_dir / "kube-controller-manager"),
                f"--kubeconfig={self.kubeconfig}",
                "--leader-elect=false",
                "--secure-port=0",
                f"--controllers={','.join(CONTROLLERS + self.extra_controllers)}",
                f"--service-account-private-key-file={pki / 'sa.key'}",
                f"--root-ca-file={pki / 'ca.crt'}",
            ],
        )

    def _wait_for_controllers(self) -> None:
        self._wait(
            "the default namespace", lambda: self._api_get("/api/v1/namespaces/default")[0] == 200
        )
        # The serviceaccount controller creating `default` proves the controllers run.
        self._wait(
            "kube-controller-manager (the default service account)",
            lambda: self._api_get("/api/v1/namespaces/default/serviceaccounts/default")[0] == 200,
        )

    def _api_get(self, path: str) -> tuple[int, bytes]:
        return _get(self.server + path, self._ssl)


def _get(url: str, context: ssl.SSLContext | None) -> tuple[int, bytes]:
    """GET ``url``; (0, b"") when nothing answers."""
    scheme, rest = url.split("://", 1)
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.rpartition(":")
    conn: http.client.HTTPConnection
    if scheme == "https":
        conn = http.client.HTTPSConnection(host, int(port), timeout=5, context=context)
    else:
        conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request("GET", "/" + path)
        response = conn.getresponse()
        return response.status, response.read()
    except (OSError, http.client.HTTPException):
        return 0, b""
    finally:
        with contextlib.suppress(OSError):
            conn.close()

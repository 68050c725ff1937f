"""A real Kubernetes node for tests: kubelet, containerd, runc, CNI, kube-proxy, a scheduler.

:class:`NodeNetwork` makes the node's own network namespace, joined to the host by a veth
pair: the node's bridge, pod addresses and iptables rules (CNI's and kube-proxy's) live in
there, so nothing of the host's network changes and two nodes never collide. The host end's
address is where the control plane and PostgreSQL listen for the pods. :class:`Node` then
starts, as children of the harness (:mod:`controlplane.processes`), kube-scheduler (there is
no node without one), containerd (Debian's package, in a cgroup of its own so its shims and
containers can be found and killed), kubelet (built by ``build.sh node`` from the control
plane's module) and kube-proxy, waits until the node is Ready and the ``kubernetes`` Service
is routed, and imports images with ``ctr``. Whatever outlives a process group is removed by
:mod:`controlplane.nodeclean`, from :meth:`Node.stop` or, if this process died, the reaper.

No CoreDNS runs: pods resolve names like the host does, so tests address Services by their
ClusterIP (kube-proxy routes it) and the host by its address.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from controlplane import harness, nodeclean, nodeconfig
from controlplane.harness import ControlPlane, ControlPlaneError
from controlplane.nodeconfig import NodePaths
from controlplane.processes import Child, Reaper, run, wait_for

log = logging.getLogger(__name__)

BIN_ENV = "ANALYSISQ_NODE_BIN"
BINARIES = ("kubelet", "kube-proxy", "kube-scheduler")
HOST_TOOLS = ("containerd", "containerd-shim-runc-v2", "runc", "ctr", "ip", "nsenter",
              "iptables", "iptables-save", "umount")  # fmt: skip
POD_CIDR = "10.88.0.0/24"
"""Inside the node's network namespace only, so every node may use the same range."""
CONTROLLERS = (
    "endpointslice-controller",
    "root-ca-certificate-publisher-controller",
    "node-lifecycle-controller",
)
"""What the control plane must run on top of its own list for a node: Service endpoints for
kube-proxy, the ``kube-root-ca.crt`` ConfigMap of service-account token volumes, and the
removal of the ``not-ready`` taint kubelet registers the node with."""


class NodeError(RuntimeError):
    """The node could not be built, started or reached; the message says why."""


def resolve_bin_dir() -> Path:
    """kubelet, kube-proxy, kube-scheduler and pause.tar: ``$ANALYSISQ_NODE_BIN`` or
    ``build.sh node`` (instant when cached)."""
    try:
        bin_dir = harness.built_dir(BIN_ENV, ("node",))
    except ControlPlaneError as exc:
        raise NodeError(str(exc)) from None
    missing = [b for b in BINARIES if not os.access(bin_dir / b, os.X_OK)]
    if not (bin_dir / "pause.tar").is_file():
        missing.append("pause.tar")
    if missing:
        raise NodeError(f"node binaries missing in {bin_dir}: {', '.join(missing)}")
    return bin_dir


def check_host() -> None:
    """Root, the Debian packages and the cgroup v1 hierarchies the node needs."""
    problems = []
    if os.geteuid() != 0:
        problems.append("a real node needs root (namespaces, cgroups, mounts)")
    tools = [t for t in HOST_TOOLS if shutil.which(t) is None]
    if tools:
        problems.append(f"missing tools: {', '.join(tools)} (tests/tools/system-packages.sh)")
    plugins = [p for p in nodeconfig.CNI_PLUGINS if not (nodeconfig.CNI_BIN_DIR / p).exists()]
    if plugins:
        problems.append(f"missing CNI plugins in {nodeconfig.CNI_BIN_DIR}: {', '.join(plugins)}")
    if not nodeclean.v1_hierarchies():
        problems.append("no cgroup v1 hierarchy under /sys/fs/cgroup")
    if problems:
        raise NodeError("; ".join(problems))


def _sh(*argv: str) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
    if result.returncode != 0:
        raise NodeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout


@dataclass
class NodeNetwork:
    """A network namespace ``netns`` whose ``eth0`` (``node_ip``) is joined to the host
    (``host_ip``) by a veth pair; its default route is the host."""

    netns: str
    host_ip: str
    node_ip: str
    prefix: int = 24

    @classmethod
    def create(cls, name: str) -> NodeNetwork:
        used = {
            ipaddress.ip_interface(a["local"] + "/" + str(a["prefixlen"])).network
            for link in json.loads(_sh("ip", "-j", "-4", "addr"))
            for a in link.get("addr_info", [])
        }
        for third in range(213, 250):
            net = ipaddress.ip_network(f"10.{third}.0.0/24")
            if not any(net.overlaps(u) for u in used):
                break
        else:
            raise NodeError("no free 10.213-249.0.0/24 network for the node's veth link")
        hosts = list(net.hosts())
        network = cls(name, str(hosts[0]), str(hosts[1]))
        host_if, node_if = f"{name[:11]}h", f"{name[:11]}n"
        _sh("ip", "netns", "add", name)
        try:
            _sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", node_if)
            _sh("ip", "link", "set", node_if, "netns", name)
            _sh("ip", "addr", "add", f"{network.host_ip}/24", "dev", host_if)
            _sh("ip", "link", "set", host_if, "up")
            inside = network.argv
            _sh(*inside(["ip", "link", "set", "lo", "up"]))
            _sh(*inside(["ip", "link", "set", node_if, "name", "eth0"]))
            _sh(*inside(["ip", "addr", "add", f"{network.node_ip}/24", "dev", "eth0"]))
            _sh(*inside(["ip", "link", "set", "eth0", "up"]))
            _sh(*inside(["ip", "route", "add", "default", "via", network.host_ip]))
            # Per-namespace sysctls: pods route out of the bridge, and bridged traffic goes
            # through iptables so kube-proxy's DNAT is undone for pod-to-pod Service replies.
            for key in ("net/ipv4/ip_forward", "net/bridge/bridge-nf-call-iptables"):
                _sh(*inside(["sh", "-c", f"echo 1 > /proc/sys/{key}"]))
        except BaseException:
            nodeclean.delete_netns(name)
            raise
        return network

    def argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside the node's network namespace."""
        return ["nsenter", f"--net=/run/netns/{self.netns}", "--", *argv]

    @property
    def pod_network_cidr(self) -> str:
        """The node side of the link, trusted by the host's PostgreSQL (pod traffic leaving
        the node is masqueraded to ``node_ip``)."""
        return str(ipaddress.ip_interface(f"{self.node_ip}/{self.prefix}").network)

    def delete(self) -> None:
        nodeclean.delete_netns(self.netns)


@dataclass
class Node:
    """One kubelet node of ``control_plane``; ``start``/``stop`` or a ``with`` block."""

    bin_dir: Path
    control_plane: ControlPlane
    network: NodeNetwork
    workdir: Path
    name: str = field(default_factory=lambda: f"aq-node-{uuid.uuid4().hex[:6]}")
    ready_timeout: float = 180.0
    startup_seconds: float = 0.0
    _children: dict[str, Child] = field(default_factory=dict)
    _started_at: float = 0.0
    _sysctls: dict[str, str] = field(default_factory=dict)

    @property
    def paths(self) -> NodePaths:
        return NodePaths(self.workdir)

    @property
    def cgroup(self) -> str:
        """The cgroup (in every v1 hierarchy) of the node's pods and containerd."""
        return f"analysisq-{self.name}"

    def log_path(self, component: str) -> Path:
        return self.workdir / "logs" / f"{component}.log"

    def __enter__(self) -> Node:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        began = time.monotonic()
        self._started_at = time.time() - 1
        self._sysctls = nodeclean.read_sysctls()
        for directory in (self.paths.containerd_root, self.paths.cni_conf_dir,
                          self.paths.kubelet_root, self.paths.pod_logs):  # fmt: skip
            directory.mkdir(parents=True, exist_ok=True)
        Reaper.shared().register_cleanup(self.cgroup, self._cleanup_argv())
        atexit.register(self.stop)
        try:
            self._make_cgroups()
            self._write_configs()
            self._start_containerd()
            self.import_image(self.bin_dir / "pause.tar")
            self._start("kube-scheduler", self._scheduler_argv(), netns=False)
            self._start("kubelet", self._kubelet_argv())
            self._start("kube-proxy", [str(self.bin_dir / "kube-proxy"),
                                       f"--config={self.paths.kube_proxy_config}"])  # fmt: skip
            self._wait("the node to be Ready", self._node_ready)
            self._wait("kube-proxy to route the kubernetes Service", self._proxy_ready)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        log.info("node %s ready in %.1f s", self.name, self.startup_seconds)

    def stop(self) -> None:
        """Stop kube-proxy, kubelet, the scheduler and containerd, then remove the node's
        containers, mounts, cgroups and network; idempotent."""
        atexit.unregister(self.stop)
        for name in reversed(list(self._children)):
            self._children.pop(name).stop(grace=10.0)
        nodeclean.clean(
            self.cgroup, self.workdir, self.network.netns, self._started_at, self._sysctls
        )
        Reaper.shared().unregister_cleanup(self.cgroup)

    def _cleanup_argv(self) -> list[str]:
        return [
            sys.executable, str(Path(nodeclean.__file__)), f"--cgroup={self.cgroup}",
            f"--workdir={self.workdir}", f"--netns={self.network.netns}",
            f"--pod-netns-after={self._started_at}",
            *(f"--sysctl={key}={value}" for key, value in self._sysctls.items()),
        ]  # fmt: skip

    # --- steps --------------------------------------------------------------------------------

    def _make_cgroups(self) -> None:
        for hierarchy in nodeclean.v1_hierarchies():
            for sub in (self.cgroup, f"{self.cgroup}/runtime"):
                path = hierarchy / sub
                path.mkdir(exist_ok=True)
                if (path / "cpuset.cpus").exists():
                    # A new cpuset has no CPUs or memory nodes: nothing could join it.
                    for key in ("cpuset.cpus", "cpuset.mems"):
                        (path / key).write_text((path.parent / key).read_text())

    def _write_configs(self) -> None:
        paths = self.paths
        paths.containerd_config.parent.mkdir(parents=True, exist_ok=True)
        paths.containerd_config.write_text(nodeconfig.containerd_toml(paths))
        bridge = f"aqbr{self.name[-6:]}"
        (paths.cni_conf_dir / "10-analysisq.conflist").write_text(
            nodeconfig.cni_conflist(paths, POD_CIDR, bridge)
        )
        paths.kubelet_config.write_text(
            nodeconfig.kubelet_yaml(
                paths, node_ip=self.network.node_ip, cgroup_root=f"/{self.cgroup}",
                ca_file=self.control_plane.ca_file,
            )
        )  # fmt: skip
        paths.kube_proxy_config.write_text(
            nodeconfig.kube_proxy_yaml(paths, node_name=self.name, pod_cidr=POD_CIDR)
        )
        # The node's components authenticate as the admin (system:masters): this node is the
        # only one, and the Node authorizer is not what these tests are about.
        admin = yaml.safe_load(self.control_plane.kubeconfig.read_text())
        paths.kubeconfig.write_text(yaml.safe_dump(admin, sort_keys=False))
        paths.kubeconfig.chmod(0o600)

    def _start(self, name: str, argv: list[str], *, netns: bool = True) -> Child:
        if netns:
            argv = self.network.argv(argv)
        child = Child(name, argv, self.log_path(name), cwd=self.workdir)
        self._children[name] = child
        return child

    def _start_containerd(self) -> None:
        # Join the node's cgroup before exec, so every shim and container is found under it.
        procs = " ".join(
            str(h / self.cgroup / "runtime" / "cgroup.procs") for h in nodeclean.v1_hierarchies()
        )
        script = f'for f in {procs}; do echo $$ > "$f"; done; exec "$@"'
        self._start(
            "containerd",
            ["sh", "-c", script, "sh", "containerd", f"--config={self.paths.containerd_config}"],
        )
        self._wait("containerd", lambda: self.ctr("version", check=False).returncode == 0, 60)

    def _scheduler_argv(self) -> list[str]:
        return [
            str(self.bin_dir / "kube-scheduler"), f"--kubeconfig={self.paths.kubeconfig}",
            f"--authentication-kubeconfig={self.paths.kubeconfig}",
            f"--authorization-kubeconfig={self.paths.kubeconfig}",
            "--leader-elect=false", "--secure-port=0",
        ]  # fmt: skip

    def _kubelet_argv(self) -> list[str]:
        return [
            str(self.bin_dir / "kubelet"), f"--config={self.paths.kubelet_config}",
            f"--kubeconfig={self.paths.kubeconfig}", f"--root-dir={self.paths.kubelet_root}",
            f"--hostname-override={self.name}", f"--node-ip={self.network.node_ip}",
            "--v=1",
        ]  # fmt: skip

    def _wait(self, what: str, check: Callable[[], bool], timeout: float | None = None) -> None:
        wait_for(what, check, self._children.values(), timeout or self.ready_timeout,
                 NodeError, interval=0.5)  # fmt: skip

    def _node_ready(self) -> bool:
        out = self.kubectl("get", "node", self.name, "-o", "json", check=False)
        if out.returncode != 0:
            return False
        conditions = json.loads(out.stdout).get("status", {}).get("conditions", [])
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    def _proxy_ready(self) -> bool:
        rules = run(self.network.argv(["iptables-save", "-t", "nat"]), timeout=30).stdout
        return "default/kubernetes:https" in rules

    # --- tools for tests ----------------------------------------------------------------------

    def kubectl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = [str(self.control_plane.kubectl_path), f"--kubeconfig={self.paths.kubeconfig}"]
        result = run([*argv, *args], timeout=60)
        if check and result.returncode != 0:
            raise NodeError(f"kubectl {' '.join(args)}: {result.stderr}")
        return result

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``ctr`` on this node's containerd, in the ``k8s.io`` namespace the CRI uses."""
        argv = ["ctr", f"--address={self.paths.containerd_socket}", "--namespace=k8s.io", *args]
        result = run(argv, timeout=300)
        if check and result.returncode != 0:
            raise NodeError(f"ctr {' '.join(args)} failed: {result.stderr.strip()}")
        return result

    def import_image(self, archive: Path) -> None:
        """Load an image archive (docker or OCI) into containerd, unpacked for the kubelet."""
        self.ctr("images", "import", str(archive))

    def in_netns(
        self, argv: Sequence[str], timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run a command in the node's network namespace (where ClusterIPs are routed)."""
        return run(self.network.argv(argv), timeout=timeout)

    def container_pids(self, namespace: str, pod: str, container: str) -> list[int]:
        """Host pids of a running container's processes (for kill -9 from outside)."""
        out = self.ctr("containers", "list", "-q").stdout.split()
        pids = []
        for cid in out:
            # A container listed a moment ago may be gone now (a pod of an earlier test that
            # finished): skip it rather than fail on its "not found".
            found = self.ctr("containers", "info", cid, check=False)
            if found.returncode != 0:
                continue
            info = json.loads(found.stdout)
            labels = info.get("Labels") or {}
            if (
                labels.get("io.kubernetes.pod.namespace") == namespace
                and labels.get("io.kubernetes.pod.name") == pod
                and labels.get("io.kubernetes.container.name") == container
            ):
                task = self.ctr("tasks", "ps", cid, check=False)
                for line in task.stdout.splitlines()[1:]:
                    with contextlib.suppress(ValueError, IndexError):
                        pids.append(int(line.split()[0]))
        return pids

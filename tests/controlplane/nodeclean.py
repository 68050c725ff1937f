"""Remove what a real test node leaves behind once its own processes are gone.

containerd's shims and the containers run outside the harness's process groups, so the node
(:mod:`controlplane.node`) puts them all under one cgroup and this script kills every process
in it (freezing it first, so nothing forks away), unmounts what is left under the node's work
directory (pod volumes, container root filesystems), removes the cgroups, the pod network
namespaces containerd created and the node's own network namespace (with its veth pair, bridge
and iptables rules), and puts back the kernel settings kubelet changed (it sets
``vm.overcommit_memory``, ``kernel.panic`` and ``kernel.panic_on_oops`` on start).
``Node.stop`` calls :func:`clean`; the reaper of :mod:`controlplane.processes` runs this file
as a script when the test process died first, so it imports nothing but the standard library.
Every step tolerates what is already gone.

    python nodeclean.py --cgroup NAME --workdir DIR --netns NAME [--pod-netns-after EPOCH]
                        [--sysctl KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
NETNS_DIR = Path("/run/netns")
KUBELET_SYSCTLS = ("vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic",
                   "kernel/panic_on_oops", "kernel/keys/root_maxkeys",
                   "kernel/keys/root_maxbytes")  # fmt: skip
"""What kubelet's ``setupKernelTunables`` writes unless ``protectKernelDefaults`` (which
would refuse to start on this machine's values instead)."""


def read_sysctls() -> dict[str, str]:
    return {key: (Path("/proc/sys") / key).read_text().strip() for key in KUBELET_SYSCTLS}


def restore_sysctls(values: dict[str, str]) -> None:
    for key, value in values.items():
        path = Path("/proc/sys") / key
        with contextlib.suppress(OSError):
            if path.read_text().strip() != value:
                path.write_text(value)


def v1_hierarchies() -> list[Path]:
    """The mounted cgroup v1 hierarchies (cpu, memory, pids, ..., name=systemd)."""
    out = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) > 2 and fields[2] == "cgroup" and fields[1].startswith(str(CGROUP_ROOT)):
            out.append(Path(fields[1]))
    return out


def _procs(directory: Path) -> list[int]:
    pids: list[int] = []
    for procs in directory.rglob("cgroup.procs"):
        with contextlib.suppress(OSError, ValueError):
            pids += [int(p) for p in procs.read_text().split()]
    return pids


def kill_cgroup(name: str, timeout: float = 30.0) -> None:
    """SIGKILL every process under cgroup ``name`` (frozen first, thawed to let them die)."""
    freezer = CGROUP_ROOT / "freezer" / name
    state = freezer / "freezer.state"
    with contextlib.suppress(OSError):
        state.write_text("FROZEN")
    pids_dir = CGROUP_ROOT / "pids" / name
    directory = pids_dir if pids_dir.is_dir() else freezer
    deadline = time.monotonic() + timeout
    while directory.is_dir():
        pids = _procs(directory)
        if not pids or time.monotonic() > deadline:
            break
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            state.write_text("THAWED")
        time.sleep(0.1)


def _unescape(path: str) -> str:
    # /proc/self/mountinfo writes space, tab, newline and backslash as octal escapes.
    for code in ("\\040", "\\011", "\\012", "\\134"):
        path = path.replace(code, chr(int(code[1:], 8)))
    return path


def unmount_under(directory: Path) -> None:
    """Lazily unmount every mount point at or below ``directory``, deepest first."""
    prefix = str(directory.resolve())
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = _unescape(line.split()[4])
        if point == prefix or point.startswith(prefix + "/"):
            points.append(point)
    for point in sorted(set(points), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)


def remove_cgroups(name: str) -> None:
    """rmdir the cgroup ``name`` and its children in every hierarchy, leaves first."""
    for hierarchy in v1_hierarchies():
        top = hierarchy / name
        if not top.is_dir():
            continue
        for directory in sorted(
            (d for d in top.rglob("*") if d.is_dir()), key=lambda d: len(d.parts), reverse=True
        ):
            with contextlib.suppress(OSError):
                directory.rmdir()
        with contextlib.suppress(OSError):
            top.rmdir()


def remove_pod_netns(after: float) -> None:
    """containerd 1.6 puts pod network namespaces in /run/netns/cni-*: drop those created
    since the node started (no other node runs on this machine's containerd namespace)."""
    for path in NETNS_DIR.glob("cni-*"):
        with contextlib.suppress(OSError):
            if path.stat().st_mtime >= after:
                subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)
                path.unlink()


def delete_netns(name: str) -> None:
    if (NETNS_DIR / name).exists():
        subprocess.run(["ip", "netns", "delete", name], capture_output=True, check=False)


def clean(
    cgroup: str,
    workdir: Path,
    netns: str,
    pod_netns_after: float | None,
    sysctls: dict[str, str],
) -> None:
    kill_cgroup(cgroup)
    unmount_under(workdir)
    remove_cgroups(cgroup)
    if pod_netns_after is not None:
        remove_pod_netns(pod_netns_after)
    delete_netns(netns)
    restore_sysctls(sysctls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cgroup", required=True)
    parser.add_argument("--workdir", required=True, type=Path)
    parser.add_argument("--netns", required=True)
    parser.add_argument("--pod-netns-after", type=float)
    parser.add_argument("--sysctl", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    sysctls = dict(item.split("=", 1) for item in args.sysctl)
    clean(args.cgroup, args.workdir, args.netns, args.pod_netns_after, sysctls)


if __name__ == "__main__":
    main()

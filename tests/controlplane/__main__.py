"""``python -m controlplane up``: run the test control plane and pod runner by hand.

Builds the binaries if they are missing, starts etcd, kube-apiserver, kube-controller-manager
and the pod runner, prints the ``export KUBECONFIG=...`` line, and tears everything down on
Ctrl-C or SIGTERM. Run it from the repository root with the project's venv:
``PYTHONPATH=tests .venv/bin/python -m controlplane up``.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from controlplane.harness import ControlPlane, ControlPlaneError, resolve_bin_dir
from controlplane.podrunner import PodRunner
from controlplane.processes import Reaper


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m controlplane")
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="run the control plane until Ctrl-C")
    up.add_argument("--workdir", type=Path, help="keep certificates, data and logs here")
    up.add_argument("--no-pods", action="store_true", help="do not start the pod runner")
    up.add_argument(
        "--credentials",
        choices=("serviceaccount", "admin", "none"),
        default="serviceaccount",
        help="what KUBECONFIG pod processes get (default: their service account's token)",
    )
    up.add_argument("-v", "--verbose", action="store_true", help="log the pod runner's work")
    return parser


def up(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s: %(message)s",
    )
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        bin_dir = resolve_bin_dir(show_build=True)
    except ControlPlaneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    plane = ControlPlane(bin_dir, workdir=args.workdir, keep_workdir=args.workdir is not None)
    runner: PodRunner | None = None
    try:
        plane.start()
        if not args.no_pods:
            runner = PodRunner(
                plane.kubeconfig, workdir=plane.root / "pods", credentials=args.credentials
            )
            runner.start()
        rss = sum(plane.rss_bytes().values()) / 2**20
        print(f"# control plane up in {plane.startup_seconds:.1f} s, {rss:.0f} MiB RSS")
        print(f"# logs in {plane.root / 'logs'}, pod logs in {plane.root / 'pods'}")
        print(f"alias kubectl={plane.kubectl_path}")
        print(f"export KUBECONFIG={plane.kubeconfig}", flush=True)
        stop.wait()
    except ControlPlaneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        print("# stopping", file=sys.stderr)
        if runner is not None:
            runner.stop()
        plane.stop()
        Reaper.close_shared()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return up(args)


if __name__ == "__main__":
    sys.exit(main())

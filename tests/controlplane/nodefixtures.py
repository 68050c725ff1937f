"""Pytest fixtures of the real-node tier: a control plane, a kubelet node, PostgreSQL, the image.

``real_node`` (session) builds the image from the repository's Dockerfile with buildah
(``tests/tools/build-image.sh``, a docker archive) while it starts, in order: the node's
network namespace (:class:`controlplane.node.NodeNetwork`), an embedded PostgreSQL listening
on the host end of the node's link, a control plane of its own listening there too (so pods
reach it through the ``kubernetes`` Service), and the node (kubelet, containerd, runc, CNI,
kube-proxy, kube-scheduler); then imports the image. Nothing is skipped: when any part cannot
run here the fixture fails with the reason. Timings (node build, image build, start) are
printed in the terminal summary. ``tests/node/conftest.py`` imports these names.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import pytest

from analysisq.db.embedded import PG_USER, EmbeddedPostgres
from controlplane import harness, node
from controlplane.fixtures import Kubectl
from controlplane.harness import ControlPlane, ControlPlaneError
from controlplane.node import Node, NodeError, NodeNetwork
from controlplane.processes import Child, Reaper
from tools.helm import ROOT
from wheelhouse import house_path

BUILD_IMAGE = ROOT / "tests" / "tools" / "build-image.sh"
IMAGE_TIMEOUT = 1800.0
IMAGE_ARCHIVE_ENV = "ANALYSISQ_NODE_IMAGE_ARCHIVE"
WORKDIR_PREFIX = "analysisq-node-"
TIMINGS: dict[str, float] = {}


def _version() -> str:
    for line in (ROOT / "pyproject.toml").read_text().splitlines():
        if line.startswith("version = "):
            return line.split('"')[1]
    raise AssertionError("no version in pyproject.toml")


IMAGE = f"localhost/analysisq:{_version()}"


@dataclass
class RealNode:
    """What the tests of this tier use."""

    node: Node
    control_plane: ControlPlane
    kubectl: Kubectl
    pg_port: int
    pg_admin_url: str
    image: str = IMAGE
    databases: list[str] = field(default_factory=list)

    @property
    def host_ip(self) -> str:
        """The host as pods see it (PostgreSQL and the apiserver listen there)."""
        return self.node.network.host_ip

    def new_database(self) -> tuple[str, str]:
        """A fresh empty database: (URL from this process, URL for pods)."""
        name = f"aq_node_{uuid.uuid4().hex[:8]}"

        async def create() -> None:
            conn = await asyncpg.connect(self.pg_admin_url)
            try:
                await conn.execute(f'CREATE DATABASE "{name}"')
            finally:
                await conn.close()

        asyncio.run(create())
        self.databases.append(name)
        local = f"postgresql://{PG_USER}@127.0.0.1:{self.pg_port}/{name}"
        return local, f"postgresql://{PG_USER}@{self.host_ip}:{self.pg_port}/{name}"


def _build_image(workdir: Path) -> tuple[Child, Path]:
    """Start the image build; ``$ANALYSISQ_NODE_IMAGE_ARCHIVE`` names an archive built
    before instead (to iterate on the tests; ``make test`` always builds)."""
    given = os.environ.get(IMAGE_ARCHIVE_ENV)
    if given:
        return Child("image", ["test", "-f", given], workdir / "logs" / "image.log"), Path(given)
    archive = workdir / "analysisq-image.tar"
    env = {**os.environ, "IMAGE_ARCHIVE": str(archive), "IMAGE_TAG": IMAGE}
    if (house := house_path(ROOT)).is_dir():  # `make wheels`: pip installs offline from it
        env["WHEELHOUSE"] = str(house)
    child = Child("build-image", ["bash", str(BUILD_IMAGE)], workdir / "logs" / "build-image.log",
                  env=env)  # fmt: skip
    return child, archive


def _fail(what: str, exc: BaseException) -> None:
    pytest.fail(f"the real node is unavailable ({what}): {exc}", pytrace=False)


@pytest.fixture(scope="session")
def real_node(request: pytest.FixtureRequest) -> Iterator[RealNode]:
    try:
        node.check_host()
        began = time.monotonic()
        node_bin = node.resolve_bin_dir()
        TIMINGS["node binaries (build.sh node)"] = time.monotonic() - began
        cp_bin = harness.resolve_bin_dir()
    except (NodeError, ControlPlaneError) as exc:
        _fail("build", exc)
    workdir = Path(tempfile.mkdtemp(prefix=WORKDIR_PREFIX))
    harness.prune_stale_workdirs(workdir.parent, prefix=WORKDIR_PREFIX)
    began = time.monotonic()
    build, archive = _build_image(workdir)
    name = f"aq{uuid.uuid4().hex[:6]}"
    reaper = Reaper.shared()
    reaper.register_cleanup(f"netns-{name}", ["ip", "netns", "delete", name])
    network = NodeNetwork.create(name)
    pg = EmbeddedPostgres(
        workdir / "pg", fsync=False, also_listen=(network.host_ip,),
        trust_networks=(network.pod_network_cidr,),
    )  # fmt: skip
    plane = ControlPlane(
        cp_bin,
        workdir=workdir / "cp",
        bind_address=network.host_ip,
        extra_controllers=node.CONTROLLERS,
        extra_apiserver_args=[
            # kubectl logs/exec: the apiserver authenticates to the kubelet as the admin.
            f"--kubelet-client-certificate={workdir / 'cp' / 'pki' / 'admin.crt'}",
            f"--kubelet-client-key={workdir / 'cp' / 'pki' / 'admin.key'}",
            "--kubelet-preferred-address-types=InternalIP",
        ],
    )
    the_node = Node(node_bin, plane, network, workdir / "node")
    failed = True
    try:
        pg.start()
        plane.start()
        the_node.start()
        TIMINGS["node start (control plane + kubelet Ready)"] = time.monotonic() - began
        code = build.wait(IMAGE_TIMEOUT)
        if code != 0:
            raise NodeError(
                f"{BUILD_IMAGE} exited with {code}; last lines of {build.log_path}:\n"
                + build.log_tail(40)
            )
        TIMINGS["image build (buildah, from test start)"] = time.monotonic() - began
        imported = time.monotonic()
        the_node.import_image(archive)
        TIMINGS["image import (ctr)"] = time.monotonic() - imported
        if archive.parent == workdir:
            archive.unlink()
        yield RealNode(
            the_node,
            plane,
            Kubectl(plane.kubectl_path, plane.kubeconfig),
            pg.port,
            pg.url(),
        )
        failed = request.session.testsfailed > 0
    except (NodeError, ControlPlaneError) as exc:
        _fail("start", exc)
    finally:
        build.stop(grace=5)
        the_node.stop()
        plane.stop(keep_workdir=True)
        pg.stop(mode="immediate")
        network.delete()
        reaper.unregister_cleanup(f"netns-{name}")
        if failed:
            print(f"\nreal node logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if TIMINGS:
        terminalreporter.section("real node timings")
        for what, seconds in TIMINGS.items():
            terminalreporter.write_line(f"{what}: {seconds:.1f} s")

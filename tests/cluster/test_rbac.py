"""Least privilege, checked by the real API server's authorizer (``kubectl auth can-i --as``).

The chart is installed with the operator watching two namespaces; a third namespace is
outside its reach. For each ServiceAccount — operator, trigger, worker — what it must be
allowed and what it must be denied. The worker's permissions must equal those of an account
nobody bound anything to. Cluster-wide mode is checked separately.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from controlplane.fixtures import Kubectl
from tools.cluster import (
    apply_analysisrun_crd,
    apply_stream,
    can_i,
    create_namespace,
    delete_namespace,
    delete_stream,
)
from tools.helm import CHART, helm_binary, render

pytestmark = pytest.mark.cluster


@dataclass(frozen=True)
class Install:
    home: str  # the release namespace (also watched)
    watched: str  # a second watched namespace
    other: str  # not watched

    def account(self, role: str) -> str:
        return f"{self.home}:analysisq-{role}"

    def ns(self, which: str) -> str:
        return str(getattr(self, which))


@pytest.fixture(scope="module")
def install(kubectl: Kubectl) -> Iterator[Install]:
    suffix = uuid.uuid4().hex[:6]
    inst = Install(f"t-rbac-home-{suffix}", f"t-rbac-watched-{suffix}", f"t-rbac-other-{suffix}")
    for name in (inst.home, inst.watched, inst.other):
        create_namespace(kubectl, name)
    apply_analysisrun_crd(kubectl)
    stream = render(
        helm_binary(),
        namespace=inst.home,
        set_values=[f"operator.watchNamespaces={{{inst.home},{inst.watched}}}"],
    )
    apply_stream(kubectl, stream)
    yield inst
    delete_stream(kubectl, stream)
    for name in (inst.home, inst.watched, inst.other):
        delete_namespace(kubectl, name)


# (role, verb, resource, namespace: "home" | "watched" | "other" | "" for cluster scope)
ALLOWED = [
    ("operator", "watch", "analysisruns.analysisq.io", "home"),
    ("operator", "list", "analysisruns.analysisq.io", "watched"),
    ("operator", "patch", "analysisruns.analysisq.io", "watched"),
    ("operator", "patch", "analysisruns.analysisq.io[status]", "home"),
    ("operator", "update", "analysisruns.analysisq.io[finalizers]", "home"),
    ("operator", "create", "deployments.apps", "watched"),
    ("operator", "patch", "deployments.apps", "home"),
    ("operator", "patch", "deployments.apps[scale]", "watched"),
    ("operator", "get", "secrets", "watched"),
    ("operator", "create", "events", "watched"),
    ("operator", "list", "pods", "watched"),
    ("operator", "list", "namespaces", ""),
    ("operator", "watch", "customresourcedefinitions.apiextensions.k8s.io", ""),
    ("trigger", "create", "analysisruns.analysisq.io", "home"),
    ("trigger", "get", "analysisruns.analysisq.io", "home"),
    ("trigger", "list", "analysisruns.analysisq.io", "home"),
    ("trigger", "delete", "analysisruns.analysisq.io", "home"),
    ("trigger", "get", "configmaps/analysisq-run-template", "home"),
]

DENIED = [
    # Nothing outside the watched namespaces.
    ("operator", "get", "secrets", "other"),
    ("operator", "list", "analysisruns.analysisq.io", "other"),
    ("operator", "create", "deployments.apps", "other"),
    # Within them, only what the operator does: no Secret listing, no deleting Deployments
    # (the worker Deployment goes by garbage collection), pods only listed, no RBAC, no
    # deleting runs.
    ("operator", "list", "secrets", "home"),
    ("operator", "delete", "deployments.apps", "home"),
    ("operator", "update", "deployments.apps", "home"),
    ("operator", "create", "pods", "home"),
    ("operator", "delete", "pods", "home"),
    ("operator", "get", "pods", "other"),
    ("operator", "create", "rolebindings.rbac.authorization.k8s.io", "home"),
    ("operator", "delete", "analysisruns.analysisq.io", "home"),
    ("operator", "create", "analysisruns.analysisq.io", "home"),
    ("operator", "delete", "namespaces", ""),
    ("operator", "update", "customresourcedefinitions.apiextensions.k8s.io", ""),
    # The trigger: runs in its own namespace, its template, nothing more.
    ("trigger", "patch", "analysisruns.analysisq.io", "home"),
    ("trigger", "update", "analysisruns.analysisq.io", "home"),
    ("trigger", "patch", "analysisruns.analysisq.io[status]", "home"),
    ("trigger", "watch", "analysisruns.analysisq.io", "home"),
    ("trigger", "create", "analysisruns.analysisq.io", "watched"),
    ("trigger", "delete", "analysisruns.analysisq.io", "other"),
    ("trigger", "get", "configmaps/analysisq-operator", "home"),
    ("trigger", "list", "configmaps", "home"),
    ("trigger", "get", "secrets", "home"),
    ("trigger", "create", "deployments.apps", "home"),
    ("trigger", "create", "jobs.batch", "home"),
    # The workers: nothing at all.
    ("worker", "get", "secrets", "home"),
    ("worker", "get", "configmaps", "watched"),
    ("worker", "list", "pods", "home"),
    ("worker", "get", "analysisruns.analysisq.io", "home"),
    ("worker", "patch", "analysisruns.analysisq.io[status]", "watched"),
    ("worker", "get", "deployments.apps", "home"),
    ("worker", "create", "events", "home"),
    ("worker", "list", "namespaces", ""),
]


def _id(case: tuple[str, str, str, str]) -> str:
    role, verb, resource, where = case
    kind = resource.split(".")[0] + (
        f"-{resource[resource.index('[') + 1 : -1]}" if "[" in resource else ""
    )
    return f"{role}-{verb}-{kind}-{where or 'cluster'}"


@pytest.mark.parametrize("case", ALLOWED, ids=_id)
def test_allowed(kubectl: Kubectl, install: Install, case: tuple[str, str, str, str]) -> None:
    role, verb, resource, where = case
    namespace = install.ns(where) if where else None
    assert can_i(kubectl, install.account(role), verb, resource, namespace)


@pytest.mark.parametrize("case", DENIED, ids=_id)
def test_denied(kubectl: Kubectl, install: Install, case: tuple[str, str, str, str]) -> None:
    role, verb, resource, where = case
    namespace = install.ns(where) if where else None
    assert not can_i(kubectl, install.account(role), verb, resource, namespace)


def test_workers_have_no_more_than_an_unbound_account(kubectl: Kubectl, install: Install) -> None:
    kubectl("create", "serviceaccount", "nobody", namespace=install.home)

    def rules(account: str) -> str:
        return kubectl(
            "auth",
            "can-i",
            "--list",
            f"--as=system:serviceaccount:{install.home}:{account}",
            namespace=install.home,
        ).stdout

    assert rules("analysisq-worker") == rules("nobody")


def test_worker_accounts_exist_without_tokens_in_every_watched_namespace(
    kubectl: Kubectl, install: Install
) -> None:
    for namespace in (install.home, install.watched):
        out = kubectl(
            "get",
            "serviceaccount",
            "analysisq-worker",
            "-o",
            "jsonpath={.automountServiceAccountToken}",
            namespace=namespace,
        ).stdout
        assert out == "false"
    missing = kubectl(
        "get", "serviceaccount", "analysisq-worker", namespace=install.other, check=False
    )
    assert missing.returncode != 0


def test_cluster_wide_operator(kubectl: Kubectl, namespace: str) -> None:
    apply_analysisrun_crd(kubectl)
    stream = render(
        helm_binary(),
        release="wide",
        namespace=namespace,
        values=[CHART / "ci" / "cluster-wide-values.yaml"],
        # No operator process: a cluster-wide one would reconcile other tests' runs.
        set_values=["operator.replicas=0"],
    )
    apply_stream(kubectl, stream)
    try:
        operator = f"{namespace}:wide-analysisq-operator"
        assert can_i(kubectl, operator, "list", "analysisruns.analysisq.io", None) is True
        assert can_i(kubectl, operator, "watch", "analysisruns.analysisq.io", "kube-system")
        assert can_i(kubectl, operator, "create", "deployments.apps", "default")
        assert not can_i(kubectl, operator, "delete", "deployments.apps", "default")
        assert not can_i(kubectl, operator, "list", "secrets", "default")
        assert not can_i(kubectl, operator, "create", "pods", "default")
        # No trigger in this variant: its account does not exist and has nothing.
        assert not can_i(
            kubectl,
            f"{namespace}:wide-analysisq-trigger",
            "create",
            "analysisruns.analysisq.io",
            namespace,
        )
    finally:
        delete_stream(kubectl, stream)

"""Fixtures of the cluster tier: the real control plane and its pod runner."""

from controlplane.fixtures import control_plane, kube_api, kubectl, namespace, pod_runner

__all__ = ["control_plane", "kube_api", "kubectl", "namespace", "pod_runner"]

"""A container's environment, resolved the way kubelet resolves it.

``envFrom`` first, then ``env`` (later entries win); values from ``value`` (with kubelet's
``$(VAR)`` expansion), ``secretKeyRef``, ``configMapKeyRef``, ``fieldRef`` and
``resourceFieldRef``. A missing, non-optional Secret, ConfigMap or key raises
:class:`ContainerConfigError`, which :mod:`controlplane.podworker` reports as kubelet does
(waiting, reason ``CreateContainerConfigError``) before retrying. Pods are raw API dicts.
"""

from __future__ import annotations

import base64
import math
import re
from collections.abc import Mapping
from typing import Any

from kubernetes import client
from kubernetes.utils import parse_quantity

from controlplane.kubeapi import raw

POD_IP = "127.0.0.1"
"""Every pod runs on this machine's loopback: its podIP and hostIP."""

_EXPANSION = re.compile(r"\$\$|\$\(([^)]*)\)")
_FIELD_SUBSCRIPT = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")


class ContainerConfigError(Exception):
    """A referenced Secret, ConfigMap or key does not exist (kubelet's
    CreateContainerConfigError); the message is kubelet's."""


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubelet's ``$(VAR)`` expansion: known names are replaced, ``$$`` is a literal ``$``,
    unknown references stay as written."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env.get(name, match.group(0))

    return _EXPANSION.sub(replace, text)


class EnvResolver:
    """Resolves one container's environment; Secrets and ConfigMaps are read once each."""

    def __init__(
        self, core: client.CoreV1Api, pod: dict[str, Any], node_allocatable: Mapping[str, str]
    ) -> None:
        self._core = core
        self._pod = pod
        self._namespace: str = pod["metadata"]["namespace"]
        self._allocatable = node_allocatable
        self._secrets: dict[str, dict[str, str] | None] = {}
        self._config_maps: dict[str, dict[str, str] | None] = {}

    def resolve(self, container: dict[str, Any]) -> dict[str, str]:
        env: dict[str, str] = {}
        for source in container.get("envFrom") or []:
            prefix = source.get("prefix") or ""
            for key, value in self._env_from(source).items():
                if "=" not in key:
                    env[prefix + key] = value
        for var in container.get("env") or []:
            name = var["name"]
            if var.get("valueFrom"):
                resolved = self._value_from(var["valueFrom"], container)
                if resolved is not None:
                    env[name] = resolved
            else:
                env[name] = expand(var.get("value") or "", env)
        return env

    # --- sources ------------------------------------------------------------------------------

    def _env_from(self, source: dict[str, Any]) -> dict[str, str]:
        if ref := source.get("secretRef"):
            data = self._secret(ref["name"])
            kind = "secret"
        elif ref := source.get("configMapRef"):
            data = self._config_map(ref["name"])
            kind = "configmap"
        else:
            return {}
        if data is None:
            if ref.get("optional"):
                return {}
            raise ContainerConfigError(f'{kind} "{ref["name"]}" not found')
        return data

    def _value_from(self, source: dict[str, Any], container: dict[str, Any]) -> str | None:
        if ref := source.get("secretKeyRef"):
            return self._key(ref, self._secret(ref["name"]), "secret", "Secret")
        if ref := source.get("configMapKeyRef"):
            return self._key(ref, self._config_map(ref["name"]), "configmap", "ConfigMap")
        if ref := source.get("fieldRef"):
            return self._field(ref["fieldPath"])
        if ref := source.get("resourceFieldRef"):
            return self._resource(ref, container)
        raise ContainerConfigError(f"unsupported valueFrom: {sorted(source)}")

    def _key(
        self, ref: dict[str, Any], data: dict[str, str] | None, kind: str, kind_title: str
    ) -> str | None:
        name, key = ref["name"], ref["key"]
        if data is None:
            if ref.get("optional"):
                return None
            raise ContainerConfigError(f'{kind} "{name}" not found')
        if key not in data:
            if ref.get("optional"):
                return None
            raise ContainerConfigError(
                f"couldn't find key {key} in {kind_title} {self._namespace}/{name}"
            )
        return data[key]

    def _field(self, path: str) -> str:
        meta, spec = self._pod["metadata"], self._pod["spec"]
        simple: dict[str, str] = {
            "metadata.name": meta["name"],
            "metadata.namespace": meta["namespace"],
            "metadata.uid": meta.get("uid", ""),
            "spec.nodeName": spec.get("nodeName") or "",
            "spec.serviceAccountName": spec.get("serviceAccountName") or "",
            "status.hostIP": POD_IP,
            "status.hostIPs": POD_IP,
            "status.podIP": POD_IP,
            "status.podIPs": POD_IP,
        }
        if path in simple:
            return simple[path]
        if match := _FIELD_SUBSCRIPT.match(path):
            return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
        raise ContainerConfigError(f"unsupported fieldRef fieldPath {path!r}")

    def _resource(self, ref: dict[str, Any], container: dict[str, Any]) -> str:
        kind, _, resource = ref["resource"].partition(".")
        resources = container.get("resources") or {}
        value = (resources.get(kind) or {}).get(resource)
        if value is None and kind == "requests":
            value = (resources.get("limits") or {}).get(resource)
        if value is None:
            value = self._allocatable.get(resource, "0") if kind == "limits" else "0"
        divisor = parse_quantity(ref.get("divisor") or "1")
        if divisor == 0:
            divisor = parse_quantity("1")
        return str(math.ceil(parse_quantity(value) / divisor))

    def _secret(self, name: str) -> dict[str, str] | None:
        if name not in self._secrets:
            secret = raw(self._core.read_namespaced_secret, name, self._namespace)
            self._secrets[name] = (
                None
                if secret is None
                else {
                    key: base64.b64decode(value).decode("utf-8", "replace")
                    for key, value in (secret.get("data") or {}).items()
                }
            )
        return self._secrets[name]

    def _config_map(self, name: str) -> dict[str, str] | None:
        # Like kubelet, only `data` feeds the environment, never `binaryData`.
        if name not in self._config_maps:
            config_map = raw(self._core.read_namespaced_config_map, name, self._namespace)
            self._config_maps[name] = (
                None if config_map is None else dict(config_map.get("data") or {})
            )
        return self._config_maps[name]

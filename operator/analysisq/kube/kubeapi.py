"""The operator's own Kubernetes calls (kopf does the watching and the AnalysisRun patches).

Deployments are written with server-side apply under one field manager, so creating and
updating are the same idempotent call. Secrets are read only to check that a reference
resolves and, for the database URL, to connect; their values never leave this module except
as the return value of ``secret_value``, and errors never include them.

The official client is synchronous: each call runs in a thread. Its errors are translated
here, once, for the operator and the daily trigger (``kube.trigger``): ``SecretMissing`` (a
reference does not resolve; retry later) and ``KubeApiError`` (the API failed; retry later;
its ``status`` is the HTTP status, None when the API was not reached), both in the
``analysisq.errors`` tree. A call may name statuses that are an answer rather than an
error (``ok``: 404 for a read, 409 for a create that already happened); they return None.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from collections.abc import Callable, Collection, Mapping
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from analysisq.errors import KubeApiError, SecretMissing
from analysisq.kube.deployment import FIELD_MANAGER
from analysisq.kube.ref import GROUP, PLURAL, VERSION, RunRef
from analysisq.spec import SecretKeyRef

_APPLY = "application/apply-patch+yaml"
_MERGE = "application/merge-patch+json"


def load_client() -> client.ApiClient:
    """In-cluster credentials in a pod, else the kubeconfig (``KUBECONFIG``)."""
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    except config.ConfigException:
        config.load_kube_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    return client.ApiClient(configuration)


class KubeApi:
    def __init__(self, api: client.ApiClient) -> None:
        self._api = api
        self._apps = client.AppsV1Api(api)
        self._core = client.CoreV1Api(api)
        self._custom = client.CustomObjectsApi(api)

    def close(self) -> None:
        self._api.close()  # type: ignore[no-untyped-call]

    async def _call(
        self,
        what: str,
        fn: Callable[..., Any],
        *args: Any,
        ok: Collection[int] = (404,),
        **kw: Any,
    ) -> Any:
        """Run a client call in a thread; the decoded JSON body, or None when the API
        answers with a status in *ok*."""

        def call() -> Any:
            response = fn(*args, _preload_content=False, **kw)
            try:
                return json.loads(response.data) if response.data else {}
            finally:
                response.release_conn()

        try:
            return await asyncio.to_thread(call)
        except ApiException as exc:
            if exc.status in ok:
                return None
            raise KubeApiError(
                f"{what}: HTTP {exc.status} {_reason(exc)}", status=exc.status
            ) from None
        except (HTTPError, OSError) as exc:
            raise KubeApiError(f"{what}: {type(exc).__name__}: {exc}") from None

    # --- deployments -----------------------------------------------------------------------

    async def apply_deployment(self, manifest: dict[str, Any]) -> dict[str, Any]:
        meta = manifest["metadata"]
        result: dict[str, Any] = await self._call(
            f"applying deployment {meta['namespace']}/{meta['name']}",
            self._apps.patch_namespaced_deployment,
            meta["name"],
            meta["namespace"],
            manifest,
            field_manager=FIELD_MANAGER,
            force=True,
            _content_type=_APPLY,
        )
        return result

    async def read_deployment(self, namespace: str, name: str) -> dict[str, Any] | None:
        result: dict[str, Any] | None = await self._call(
            f"reading deployment {namespace}/{name}",
            self._apps.read_namespaced_deployment,
            name,
            namespace,
        )
        return result

    async def scale_deployment(self, namespace: str, name: str, replicas: int) -> bool:
        """Set replicas through the scale subresource; False if there is no such Deployment."""
        result = await self._call(
            f"scaling deployment {namespace}/{name}",
            self._apps.patch_namespaced_deployment_scale,
            name,
            namespace,
            {"spec": {"replicas": replicas}},
        )
        return result is not None

    async def list_pods(self, namespace: str, selector: Mapping[str, str]) -> list[dict[str, Any]]:
        """The pods matching a label selector (to see why workers are not ready)."""
        result = await self._call(
            f"listing pods in {namespace}",
            self._core.list_namespaced_pod,
            namespace,
            label_selector=",".join(f"{k}={v}" for k, v in selector.items()),
        )
        return list((result or {}).get("items") or [])

    # --- secrets ---------------------------------------------------------------------------

    async def _secret_data(self, namespace: str, ref: SecretKeyRef) -> dict[str, str]:
        secret = await self._call(
            f"reading secret {namespace}/{ref.name}",
            self._core.read_namespaced_secret,
            ref.name,
            namespace,
        )
        if secret is None:
            raise SecretMissing(f"secret {ref.name} not found in namespace {namespace}")
        data: dict[str, str] = secret.get("data") or {}
        if ref.key not in data:
            raise SecretMissing(f"secret {namespace}/{ref.name} has no key {ref.key!r}")
        return data

    async def check_secret(self, namespace: str, ref: SecretKeyRef) -> None:
        """Raise ``SecretMissing`` unless the Secret exists and has the key."""
        await self._secret_data(namespace, ref)

    async def secret_value(self, namespace: str, ref: SecretKeyRef) -> str:
        data = await self._secret_data(namespace, ref)
        try:
            return base64.b64decode(data[ref.key]).decode("utf-8").strip()
        except (binascii.Error, UnicodeDecodeError):
            raise SecretMissing(
                f"secret {namespace}/{ref.name} key {ref.key!r} is not UTF-8 text"
            ) from None

    # --- the AnalysisRun -------------------------------------------------------------------

    async def patch_run_status(self, ref: RunRef, status: dict[str, Any]) -> None:
        """Patch status now (kopf patches at the end of a handler; a long fill shows sooner)."""
        await self._call(
            f"patching status of {ref.display_name}",
            self._custom.patch_namespaced_custom_object_status,
            GROUP,
            VERSION,
            ref.namespace,
            PLURAL,
            ref.name,
            {"status": status},
            _content_type=_MERGE,
        )

    async def patch_run(self, ref: RunRef, patch: dict[str, Any]) -> bool:
        """Merge-patch the AnalysisRun (spec or metadata), only while it is the same object
        (``uid`` precondition): False if it is gone or was recreated under its name."""
        body = {**patch, "metadata": {**patch.get("metadata", {}), "uid": ref.uid}}
        try:
            result = await self._call(
                f"patching {ref.display_name}",
                self._custom.patch_namespaced_custom_object,
                GROUP,
                VERSION,
                ref.namespace,
                PLURAL,
                ref.name,
                body,
                _content_type=_MERGE,
            )
        except KubeApiError as exc:
            if exc.status == 409:
                return False
            raise
        return result is not None

    # --- AnalysisRuns and their template (the daily trigger) ------------------------------

    async def read_config_map(self, namespace: str, name: str) -> dict[str, str] | None:
        """The ConfigMap's data; None if it does not exist."""
        result = await self._call(
            f"reading ConfigMap {namespace}/{name}",
            self._core.read_namespaced_config_map,
            name,
            namespace,
        )
        return None if result is None else dict(result.get("data") or {})

    async def create_run(self, body: dict[str, Any]) -> bool:
        """Create an AnalysisRun; False when one of that name already exists."""
        meta = body["metadata"]
        created = await self._call(
            f"creating AnalysisRun {meta['namespace']}/{meta['name']}",
            self._custom.create_namespaced_custom_object,
            GROUP,
            VERSION,
            meta["namespace"],
            PLURAL,
            body,
            ok=(409,),
        )
        return created is not None

    async def list_runs(self, namespace: str, selector: Mapping[str, str]) -> list[dict[str, Any]]:
        """The AnalysisRuns of *namespace* matching a label selector."""
        result = await self._call(
            f"listing the AnalysisRuns of {namespace}",
            self._custom.list_namespaced_custom_object,
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            label_selector=",".join(f"{k}={v}" for k, v in selector.items()),
            ok=(),
        )
        return list(result.get("items") or [])

    async def delete_run(self, namespace: str, name: str, uid: str, resource_version: str) -> bool:
        """Delete an AnalysisRun only while it is the object seen (uid and resourceVersion
        preconditions); False if it changed (409) or is gone (404)."""
        options = client.V1DeleteOptions(
            preconditions=client.V1Preconditions(
                uid=uid or None, resource_version=resource_version or None
            )
        )
        deleted = await self._call(
            f"deleting AnalysisRun {namespace}/{name}",
            self._custom.delete_namespaced_custom_object,
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            name,
            body=options,
            ok=(404, 409),
        )
        return deleted is not None


def _reason(exc: ApiException) -> str:
    """The API's message for a failed call (a Status object), else its HTTP reason."""
    try:
        body = json.loads(exc.body or "{}")
    except (TypeError, ValueError):
        body = {}
    message = body.get("message") if isinstance(body, dict) else None
    return str(message or exc.reason or "")[:500]

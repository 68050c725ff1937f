"""Small helpers over the official ``kubernetes`` client, shared by the pod runner modules.

The pod runner works on raw API dicts (camelCase, exactly what the server sent) rather than
the client's generated models, so it asks the client for undecoded responses.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

STRATEGIC_MERGE = "application/strategic-merge-patch+json"
MERGE = "application/merge-patch+json"


def api_client(kubeconfig: Path, pool_size: int = 32) -> client.ApiClient:
    """An ApiClient for ``kubeconfig`` whose connection pool fits many threads."""
    configuration = client.Configuration()
    config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
    configuration.connection_pool_maxsize = pool_size
    return client.ApiClient(configuration)


REQUEST_TIMEOUT = (5, 30)
"""Connect and read timeouts, so that no call hangs on a stopped or stuck apiserver."""


def raw(call: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, Any] | None:
    """Call an API method and return the JSON body as a dict; None on 404."""
    kwargs.setdefault("_request_timeout", REQUEST_TIMEOUT)
    try:
        response = call(*args, _preload_content=False, **kwargs)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    try:
        status = response.status
        body = response.data
    finally:
        response.release_conn()
    if status == 404:
        return None
    if not 200 <= status < 300:
        raise ApiException(status=status, reason=body.decode("utf-8", "replace"))
    result: dict[str, Any] = json.loads(body)
    return result


def ignoring(
    statuses: tuple[int, ...], call: Callable[..., Any], *args: Any, **kwargs: Any
) -> bool:
    """Call an API method for its effect; False when it failed with one of ``statuses``."""
    try:
        raw(call, *args, **kwargs)
    except ApiException as exc:
        if exc.status in statuses:
            return False
        raise
    return True

"""Names derived from an AnalysisRun: the run id, the worker Deployment, labels, ownership.

The run id in the database is ``<namespace>/<name>/<uid>``: unique across namespaces, and a
run deleted (rows kept) then created again under the same name is a new run, not a resumed
one, as Kubernetes treats the new object. The database ``name`` column holds
``<namespace>/<name>``, so ``analysisq`` commands find the newest run by that name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

GROUP = "analysisq.io"
VERSION = "v1alpha1"
PLURAL = "analysisruns"
KIND = "AnalysisRun"
API_VERSION = f"{GROUP}/{VERSION}"

#: The label every worker pod of a run carries (the AnalysisRun's name).
RUN_LABEL = f"{GROUP}/run"


@dataclass(frozen=True)
class RunRef:
    """Which AnalysisRun: what every handler and service call is about."""

    namespace: str
    name: str
    uid: str
    generation: int = 0

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> RunRef:
        meta = body["metadata"]
        return cls(
            namespace=meta["namespace"],
            name=meta["name"],
            uid=meta["uid"],
            generation=int(meta.get("generation") or 0),
        )

    @property
    def run_id(self) -> str:
        return f"{self.namespace}/{self.name}/{self.uid}"

    @property
    def display_name(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def deployment_name(self) -> str:
        return f"{self.name}-workers"

    def worker_labels(self) -> dict[str, str]:
        """Labels of the Deployment and its pods (the selector is the last two)."""
        return {
            "app.kubernetes.io/name": "analysisq",
            "app.kubernetes.io/instance": self.name,
            "app.kubernetes.io/managed-by": "analysisq-operator",
            "app.kubernetes.io/component": "worker",
            RUN_LABEL: self.name,
        }

    def selector(self) -> dict[str, str]:
        return {"app.kubernetes.io/component": "worker", RUN_LABEL: self.name}

    def owner_reference(self) -> dict[str, Any]:
        """The run owns its Deployment: deleting the run deletes it (garbage collection)."""
        return {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }

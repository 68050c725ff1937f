"""The daily trigger: create the day's AnalysisRun from a template, prune old finished runs.

``analysisq trigger`` (the command of the chart's CronJob, ``analysisq.cli.trigger``)
calls :func:`trigger` with its validated options (``analysisq.settings.TriggerSettings``).
The rules are pure functions so unit tests check them without a cluster:

- the run of a day is named ``<prefix>-YYYYMMDD`` (the UTC date), so a CronJob that fires
  twice, or is retried, asks for the same name and the second create is an AlreadyExists,
  which counts as success (:func:`run_name`);
- the spec comes from a ConfigMap key holding YAML (a bare spec or a whole AnalysisRun
  manifest) and is validated with the shared :class:`~analysisq.spec.AnalysisRunSpec` before
  anything is created (:func:`template_spec`);
- created runs carry the label ``analysisq.io/trigger=<prefix>``; only runs with that label
  are ever pruned, and only finished ones (phase Succeeded or Failed): the ``keep`` newest of
  them stay, ordered by the date in their name, then by creation time (:func:`runs_to_prune`).
  Runs still in progress are never deleted and do not count, as a CronJob's history limits
  count finished Jobs only.

It needs ``create``, ``get``, ``list`` and ``delete`` on ``analysisruns`` and ``get`` on the
template ConfigMap. It talks to the cluster through the operator's ``KubeApi`` (which
translates the client's errors once, into ``KubeApiError``); a run the API server refuses
(422) is a ``SpecError``. Messages carry the API server's reason, never credentials.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import yaml
from kubernetes import config
from kubernetes.config.config_exception import ConfigException

from analysisq.errors import ConfigError, KubeApiError, SpecError
from analysisq.kube.kubeapi import KubeApi, load_client
from analysisq.kube.ref import API_VERSION, GROUP, KIND
from analysisq.kube.status import FINISHED, timestamp
from analysisq.settings import TriggerSettings, check_prefix
from analysisq.spec import parse_spec, spec_mapping

log = logging.getLogger("analysisq.trigger")

#: The label naming the trigger (its prefix) that created a run; pruning selects on it.
TRIGGER_LABEL = f"{GROUP}/trigger"
#: The UTC day a triggered run is for (``YYYY-MM-DD``), as an annotation.
DATE_ANNOTATION = f"{GROUP}/run-date"

_DATE_SUFFIX = re.compile(r"-(\d{8})$")
_SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


# --- names and dates ------------------------------------------------------------------------


def run_name(prefix: str, day: date) -> str:
    """The deterministic name of the run for ``day``: ``daily-20250131``."""
    return f"{check_prefix(prefix)}-{day:%Y%m%d}"


def name_date(prefix: str, name: str) -> date | None:
    """The day in a name made by :func:`run_name` with this prefix, else None."""
    if not name.startswith(prefix + "-"):
        return None
    match = _DATE_SUFFIX.search(name)
    if match is None or match.start() != len(prefix):
        return None
    try:
        return datetime.strptime(match.group(1), "%Y%m%d").date()
    except ValueError:
        return None


def today_utc(now: datetime | None = None) -> date:
    """The UTC date now (or of ``now``): the day a run triggered at 02:00 UTC is for."""
    return (now or datetime.now(UTC)).astimezone(UTC).date()


# --- the template -----------------------------------------------------------------------------


def template_spec(text: str, *, source: str) -> dict[str, Any]:
    """The spec in a template (YAML: a bare spec or an AnalysisRun manifest), validated.

    The returned dict is the template's own spec, not the model's dump: the API server applies
    the CRD defaults, so a run created today looks like one written by hand.
    """
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError(f"{source} is not valid YAML: {exc}") from None
    spec = spec_mapping(data, source=source)
    parse_spec(spec, source=source)
    return spec


def run_manifest(
    *,
    name: str,
    namespace: str,
    prefix: str,
    day: date,
    spec: Mapping[str, Any],
    deadline: datetime | None = None,
) -> dict[str, Any]:
    """The AnalysisRun to create; ``deadline`` replaces the template's (a fixed time would be
    wrong for every day but one)."""
    body_spec = dict(spec)
    if deadline is not None:
        body_spec["deadline"] = timestamp(deadline)
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {
                "app.kubernetes.io/name": "analysisq",
                "app.kubernetes.io/managed-by": "analysisq-trigger",
                TRIGGER_LABEL: prefix,
            },
            "annotations": {DATE_ANNOTATION: day.isoformat()},
        },
        "spec": body_spec,
    }


# --- pruning ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunInfo:
    """What pruning needs to know about one existing run."""

    name: str
    phase: str | None
    created: datetime
    uid: str = ""
    resource_version: str = ""

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> RunInfo:
        meta = body.get("metadata") or {}
        stamp = meta.get("creationTimestamp") or "1970-01-01T00:00:00Z"
        return cls(
            name=meta["name"],
            phase=(body.get("status") or {}).get("phase"),
            created=datetime.fromisoformat(stamp.replace("Z", "+00:00")),
            uid=meta.get("uid", ""),
            resource_version=meta.get("resourceVersion", ""),
        )

    @property
    def finished(self) -> bool:
        return self.phase in FINISHED


def runs_to_prune(prefix: str, runs: Iterable[RunInfo], keep: int) -> list[RunInfo]:
    """The finished runs beyond the ``keep`` newest finished ones, oldest last.

    Newest means the latest date in the name (a backfilled run is as old as its day), then
    the latest creation time; runs not finished are never returned.
    """
    if keep < 0:
        raise ConfigError(f"keep must be 0 or more, not {keep}")

    def newest_first(run: RunInfo) -> tuple[date, datetime, str]:
        return (name_date(prefix, run.name) or run.created.date(), run.created, run.name)

    finished = sorted((r for r in runs if r.finished), key=newest_first, reverse=True)
    return finished[keep:]


# --- talking to the cluster -------------------------------------------------------------------


def default_namespace() -> str:
    """The pod's namespace, else the kubeconfig context's, else ``default``."""
    try:
        return _SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
    except OSError:
        pass
    try:
        _, context = config.list_kube_config_contexts()  # type: ignore[no-untyped-call]
    except (ConfigException, OSError):
        return "default"
    namespace = (context or {}).get("context", {}).get("namespace")
    return str(namespace) if namespace else "default"


@dataclass
class TriggerResult:
    """What one trigger did."""

    name: str
    namespace: str
    created: bool
    pruned: list[str] = field(default_factory=list)


class Trigger:
    """Creates the day's run and prunes old ones, through the operator's ``KubeApi``."""

    def __init__(self, kube: KubeApi) -> None:
        self._kube = kube

    async def read_template(self, namespace: str, configmap: str, key: str) -> dict[str, Any]:
        where = f"ConfigMap {namespace}/{configmap}"
        data = await self._kube.read_config_map(namespace, configmap)
        if data is None:
            raise ConfigError(f"the run template {where} does not exist")
        if key not in data:
            raise ConfigError(f"{where} has no key {key!r} (it has: {', '.join(sorted(data))})")
        return template_spec(data[key], source=f"run template {where} key {key!r}")

    async def create(self, body: dict[str, Any]) -> bool:
        """Create the run; False when it already exists (a second trigger of the same day)."""
        try:
            return await self._kube.create_run(body)
        except KubeApiError as exc:
            if exc.status == 422:
                raise SpecError(f"the API server refused the run: {exc.message}") from None
            raise

    async def list_runs(self, namespace: str, prefix: str) -> list[RunInfo]:
        items = await self._kube.list_runs(namespace, {TRIGGER_LABEL: prefix})
        return [RunInfo.from_body(item) for item in items]

    async def delete(self, namespace: str, run: RunInfo) -> bool:
        """Delete one run if it is still the object we saw finished; False if it changed."""
        # The preconditions make the delete conditional on the object we looked at: a run
        # re-created or changed since the list is left alone (409), a gone one is fine (404).
        return await self._kube.delete_run(namespace, run.name, run.uid, run.resource_version)

    async def run(
        self, options: TriggerSettings, namespace: str, *, now: datetime | None = None
    ) -> TriggerResult:
        """Create the run of ``options.date`` (today, UTC) in *namespace* and prune; see the
        module doc."""
        now = now or datetime.now(UTC)
        prefix = check_prefix(options.prefix)
        day = options.date or today_utc(now)
        name = run_name(prefix, day)
        spec = await self.read_template(namespace, options.template_configmap, options.template_key)
        deadline = now + options.deadline_in if options.deadline_in else None
        body = run_manifest(
            name=name, namespace=namespace, prefix=prefix, day=day, spec=spec, deadline=deadline
        )
        created = await self.create(body)
        result = TriggerResult(name=name, namespace=namespace, created=created)
        log.info(
            "created the run" if created else "the run already exists; nothing to create",
            extra={"run": f"{namespace}/{name}", "date": day.isoformat()},
        )
        if options.no_prune:
            return result
        runs = await self.list_runs(namespace, prefix)
        for run in runs_to_prune(prefix, runs, options.keep):
            if await self.delete(namespace, run):
                result.pruned.append(run.name)
                log.info("pruned a finished run", extra={"run": f"{namespace}/{run.name}"})
        return result


async def trigger(options: TriggerSettings, *, now: datetime | None = None) -> TriggerResult:
    """Run the trigger with the ambient configuration (the pod's service account in a
    cluster, else ``KUBECONFIG``); the namespace defaults as ``default_namespace`` says."""
    try:
        kube = KubeApi(load_client())
    except (ConfigException, OSError) as exc:
        raise ConfigError(
            f"no Kubernetes configuration (in-cluster or kubeconfig): {exc}"
        ) from None
    try:
        return await Trigger(kube).run(options, options.namespace or default_namespace(), now=now)
    finally:
        kube.close()

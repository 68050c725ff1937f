"""The daily trigger: create the day's AnalysisRun from a template, prune old finished runs.

``analysisq trigger`` (the command of the chart's CronJob, ``analysisq.cli.trigger_cmd``)
calls :func:`trigger`. The rules are pure functions so unit tests check them without a
cluster:

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
template ConfigMap. Kubernetes API errors are translated here (``KubeApiError``, the
operator's, and ``SpecError`` for a run the API server refuses); their messages carry the API
server's reason, never credentials.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException
from urllib3.exceptions import HTTPError

from analysisq.errors import AnalysisqError, ConfigError, SpecError
from analysisq.kube.kubeapi import KubeApiError, load_client
from analysisq.kube.ref import API_VERSION, GROUP, KIND, PLURAL, VERSION
from analysisq.spec import parse_spec

log = logging.getLogger("analysisq.trigger")

#: The label naming the trigger (its prefix) that created a run; pruning selects on it.
TRIGGER_LABEL = f"{GROUP}/trigger"
#: The UTC day a triggered run is for (``YYYY-MM-DD``), as an annotation.
DATE_ANNOTATION = f"{GROUP}/run-date"
FINISHED_PHASES = frozenset({"Succeeded", "Failed"})

_PREFIX = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DATE_SUFFIX = re.compile(r"-(\d{8})$")
_DURATION = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")
_SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
#: The AnalysisRun name is a label value on worker pods: the CRD caps it at 63 characters.
_MAX_NAME = 63


# --- names and dates ------------------------------------------------------------------------


def check_prefix(prefix: str) -> str:
    """``prefix`` if ``<prefix>-YYYYMMDD`` is a valid AnalysisRun name, else ConfigError."""
    if not _PREFIX.match(prefix):
        raise ConfigError(
            f"invalid run name prefix {prefix!r}: use lowercase letters, digits and '-', "
            "starting and ending with a letter or digit"
        )
    if len(prefix) + len("-YYYYMMDD") > _MAX_NAME:
        raise ConfigError(
            f"run name prefix {prefix!r} is too long: at most {_MAX_NAME - 9} characters"
        )
    return prefix


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


def parse_day(text: str) -> date:
    """A ``YYYY-MM-DD`` date (for ``--date``), or ConfigError."""
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        try:
            return date.fromisoformat(text)
        except ValueError:
            pass
    raise ConfigError(f"invalid date {text!r}: expected YYYY-MM-DD (a UTC day)")


def parse_duration(text: str) -> timedelta:
    """``6h``, ``90m``, ``1d12h``, ``45s`` (for ``--deadline-in``), or ConfigError."""
    match = _DURATION.match(text)
    if not text or match is None:
        raise ConfigError(f"invalid duration {text!r}: expected e.g. 6h, 90m, 1d12h")
    days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
    delta = timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)
    if delta <= timedelta(0):
        raise ConfigError(f"invalid duration {text!r}: it must be longer than zero")
    return delta


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
    if isinstance(data, dict) and data.get("kind") == "AnalysisRun":
        data = data.get("spec")
    if not isinstance(data, dict):
        raise SpecError(f"{source} must hold an AnalysisRun spec (a YAML mapping)")
    parse_spec(data, source=source)
    return data


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
        body_spec["deadline"] = deadline.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
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
        return self.phase in FINISHED_PHASES


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


def _api_error(exc: ApiException | HTTPError, doing: str) -> AnalysisqError:
    """Translate a client error; the message is the API server's, which holds no secrets."""
    if isinstance(exc, HTTPError):
        return KubeApiError(f"cannot reach the Kubernetes API while {doing}: {exc}")
    try:
        body = json.loads(exc.body or "{}")
    except (TypeError, ValueError):
        body = {}
    message = (body.get("message") if isinstance(body, dict) else None) or exc.reason
    if exc.status == 422:
        return SpecError(f"the API server refused the run while {doing}: {message}")
    if exc.status == 403:
        return KubeApiError(f"forbidden while {doing}: {message}")
    return KubeApiError(f"Kubernetes API error {exc.status} while {doing}: {message}")


def _call(
    doing: str, fn: Callable[..., Any], *args: Any, ok: Collection[int] = (), **kw: Any
) -> Any:
    """``fn(*args, **kw)``; None when the API answers with a status in ``ok``, else the
    translated error."""
    try:
        return fn(*args, **kw)
    except ApiException as exc:
        if exc.status in ok:
            return None
        raise _api_error(exc, doing) from None
    except HTTPError as exc:
        raise _api_error(exc, doing) from None


@dataclass
class TriggerResult:
    """What one trigger did."""

    name: str
    namespace: str
    created: bool
    pruned: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class TriggerOptions:
    """The inputs of one trigger (the CLI flags of ``analysisq trigger``)."""

    namespace: str
    template_configmap: str
    template_key: str = "spec.yaml"
    prefix: str = "daily"
    day: date | None = None
    keep: int | None = 30
    deadline_in: timedelta | None = None


class Trigger:
    """Creates the day's run and prunes old ones, through one API client."""

    def __init__(self, api: client.ApiClient) -> None:
        self._core = client.CoreV1Api(api)
        self._custom = client.CustomObjectsApi(api)

    def read_template(self, namespace: str, configmap: str, key: str) -> dict[str, Any]:
        where = f"ConfigMap {namespace}/{configmap}"
        cm = _call(
            f"reading the run template {where}",
            self._core.read_namespaced_config_map,
            configmap,
            namespace,
            ok=(404,),
        )
        if cm is None:
            raise ConfigError(f"the run template {where} does not exist")
        data: dict[str, str] = dict(cm.data or {})
        if key not in data:
            raise ConfigError(f"{where} has no key {key!r} (it has: {', '.join(sorted(data))})")
        return template_spec(data[key], source=f"run template {where} key {key!r}")

    def create(self, body: dict[str, Any]) -> bool:
        """Create the run; False when it already exists (a second trigger of the same day)."""
        meta = body["metadata"]
        created = _call(
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

    def list_runs(self, namespace: str, prefix: str) -> list[RunInfo]:
        listing = _call(
            f"listing the AnalysisRuns of {namespace}",
            self._custom.list_namespaced_custom_object,
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            label_selector=f"{TRIGGER_LABEL}={prefix}",
        )
        return [RunInfo.from_body(item) for item in listing.get("items") or []]

    def delete(self, namespace: str, run: RunInfo) -> bool:
        """Delete one run if it is still the object we saw finished; False if it changed."""
        # The preconditions make the delete conditional on the object we looked at: a run
        # re-created or changed since the list is left alone (409), a gone one is fine (404).
        options = client.V1DeleteOptions(
            preconditions=client.V1Preconditions(
                uid=run.uid or None, resource_version=run.resource_version or None
            )
        )
        deleted = _call(
            f"deleting AnalysisRun {namespace}/{run.name}",
            self._custom.delete_namespaced_custom_object,
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            run.name,
            body=options,
            ok=(404, 409),
        )
        return deleted is not None

    def run(self, options: TriggerOptions, *, now: datetime | None = None) -> TriggerResult:
        """Create the run of ``options.day`` (today, UTC) and prune; see the module doc."""
        now = now or datetime.now(UTC)
        prefix = check_prefix(options.prefix)
        day = options.day or today_utc(now)
        name = run_name(prefix, day)
        spec = self.read_template(
            options.namespace, options.template_configmap, options.template_key
        )
        deadline = now + options.deadline_in if options.deadline_in else None
        body = run_manifest(
            name=name,
            namespace=options.namespace,
            prefix=prefix,
            day=day,
            spec=spec,
            deadline=deadline,
        )
        created = self.create(body)
        result = TriggerResult(name=name, namespace=options.namespace, created=created)
        log.info(
            "created the run" if created else "the run already exists; nothing to create",
            extra={"run": f"{options.namespace}/{name}", "date": day.isoformat()},
        )
        if options.keep is None:
            return result
        runs = self.list_runs(options.namespace, prefix)
        for run in runs_to_prune(prefix, runs, options.keep):
            if self.delete(options.namespace, run):
                result.pruned.append(run.name)
                log.info("pruned a finished run", extra={"run": f"{options.namespace}/{run.name}"})
        return result


def trigger(options: TriggerOptions, *, now: datetime | None = None) -> TriggerResult:
    """Run the trigger with the ambient configuration (the pod's service account in a
    cluster, else ``KUBECONFIG``)."""
    try:
        api = load_client()
    except (ConfigException, OSError) as exc:
        raise ConfigError(
            f"no Kubernetes configuration (in-cluster or kubeconfig): {exc}"
        ) from None
    try:
        return Trigger(api).run(options, now=now)
    finally:
        api.close()  # type: ignore[no-untyped-call]

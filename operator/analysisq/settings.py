"""Process configuration, validated once at start-up, grouped by the role that reads it.

Every field can be set by the environment with the prefix ``ANALYSISQ_``
(``ANALYSISQ_DATABASE_URL``; the bare ``DATABASE_URL`` is honoured too) and by the CLI flag
of the same name; the names are flat (a contract with the chart and the docs) while the
fields are declared by role: ``CommonSettings`` (database, logs), ``WorkerSettings``,
``OperatorSettings``, ``LocalSettings``. ``Settings`` is all of them, what ``analysisq``
loads once for every command. ``TriggerSettings`` (``ANALYSISQ_TRIGGER_*``) are the options
of ``analysisq trigger``, validated by the same ``load``. What a run does lives in its spec
(``analysisq.spec``); this is how a process runs.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import AliasChoices, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from analysisq.errors import ConfigError

_DURATION = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")
_PREFIX = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
#: The AnalysisRun name is a label value on worker pods: the CRD caps it at 63 characters.
MAX_RUN_NAME = 63


def _default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "analysisq"


class _Base(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ANALYSISQ_", extra="forbid")


class CommonSettings(_Base):
    """What every command reads: the database and the logs."""

    #: PostgreSQL URL; unset = the embedded PostgreSQL under ``data_dir``.
    database_url: str | None = Field(
        default=None, validation_alias=AliasChoices("ANALYSISQ_DATABASE_URL", "DATABASE_URL")
    )
    #: What sits between analysisq and PostgreSQL: ``none`` (a direct connection) or
    #: ``transaction`` (PgBouncer, Supavisor, RDS Proxy in transaction pooling mode: no
    #: server-side prepared statement outlives a statement; see docs/pooler.md).
    database_pooler: Literal["none", "transaction"] = "none"
    #: Where local runs keep the embedded database and results.
    data_dir: Path = Field(default_factory=_default_data_dir)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "text"] = "json"


class WorkerSettings(_Base):
    """``analysisq worker``: polling, retries, shutdown, its connection pool."""

    #: Seconds a worker sleeps when nothing is claimable (jittered).
    poll_seconds: float = Field(default=0.5, gt=0, le=60)
    #: First retry backoff ceiling; doubles per attempt (full jitter).
    retry_base_seconds: float = Field(default=2.0, ge=0, le=3600)
    retry_cap_seconds: float = Field(default=300.0, ge=0, le=86_400)
    #: 429s an item may take without burning an attempt.
    max_deferrals: int = Field(default=20, ge=0, le=1000)
    #: Hold one batch of claims beyond ``batchSize``, claimed while the last batch is
    #: written, so the next attempts need not wait for that round trip (a worker that dies
    #: then leaves up to 2 x ``batchSize`` items to the rescuer instead of ``batchSize``).
    prefetch: bool = True
    #: On SIGTERM, in-flight items get this long to finish before they are released.
    shutdown_grace_seconds: float = Field(default=20.0, ge=0, le=3600)
    #: Database pool size per worker process.
    pool_size: int = Field(default=4, ge=2, le=100)
    #: No statement of a worker waits longer for the database (a half-open connection after
    #: a failover fails here instead of hanging); heartbeats wait a third of a lease at most.
    database_command_timeout_seconds: float = Field(default=30.0, gt=0, le=3600)


class OperatorSettings(_Base):
    """``analysisq operator`` (see docs/operator.md)."""

    #: Namespaces to watch, comma-separated; empty = every namespace.
    namespaces: str = ""
    #: The image of the worker pods (the operator's own image in a normal install).
    worker_image: str = "analysisq:latest"
    #: Service account of the worker pods; workers need no Kubernetes API access.
    worker_service_account: str | None = None
    #: terminationGracePeriodSeconds of worker pods: longer than the worker's shutdown grace
    #: so that a stopping worker releases its claims before it is killed.
    worker_grace_seconds: int = Field(default=30, ge=1, le=3600)
    #: The Secret (in each run's namespace) holding the database URL for runs without
    #: ``databaseSecretRef``, and its key.
    database_secret_name: str = "analysisq-database"
    database_secret_key: str = "url"
    #: Seconds between two status reconciliations of an active run.
    reconcile_seconds: float = Field(default=15.0, ge=0.2, le=600)
    #: Seconds between two rescues of a run's stuck items (``queue.rescue``; the design:
    #: hourly at the latest). The name is the chart's and kept.
    stuck_reset_seconds: float = Field(default=300.0, ge=1, le=3600)
    #: Liveness endpoint port (``/healthz``) and Prometheus metrics port (``/metrics``);
    #: 0 turns one off.
    health_port: int = Field(default=8080, ge=0, le=65535)
    metrics_port: int = Field(default=9090, ge=0, le=65535)
    #: Seconds between two reads of a run's provider metrics from the database (one pass
    #: over its items and one over its results: costly for runs of a million items).
    provider_metrics_seconds: float = Field(default=60.0, ge=1, le=3600)
    #: Port of the dashboard the operator serves (the page of ``analysisq dashboard``,
    #: read-only unless ``dashboard_action_token`` is set); 0 turns it off.
    dashboard_port: int = Field(default=0, ge=0, le=65535)
    #: A secret (from the chart's Secret) that enables the dashboard's actions in the
    #: cluster; a POST must carry it. Unset: the operator's dashboard is read-only.
    dashboard_action_token: str | None = Field(default=None, min_length=16, repr=False)
    #: Host names besides localhost that the operator's dashboard answers to (an Ingress's),
    #: comma-separated: other names are refused (DNS rebinding).
    dashboard_allowed_hosts: str = ""
    #: Kubernetes watch timeouts: the server ends a watch after ``watch_server_timeout``
    #: seconds, the client gives up after ``watch_client_timeout`` (a lost connection).
    watch_server_timeout: int = Field(default=300, ge=10, le=3600)
    watch_client_timeout: int = Field(default=330, ge=15, le=3900)


class LocalSettings(_Base):
    """``analysisq run`` / ``demo`` and the prompt import."""

    #: Import refuses prompts longer than this many characters.
    max_prompt_chars: int = Field(default=100_000, ge=1, le=10_000_000)
    #: Prompts written per statement by the import.
    import_batch_size: int = Field(default=1000, ge=1, le=100_000)
    #: How often ``analysisq run`` rescues stuck items itself (``queue.rescue``; workers also
    #: do, every quarter lease).
    rescue_interval_seconds: float = Field(default=30.0, gt=0, le=3600)
    #: Worker processes ``analysisq run`` may restart after unexpected exits before giving up.
    max_worker_restarts: int = Field(default=100, ge=0, le=100_000)
    #: Seconds between progress lines when the output is not a terminal.
    progress_interval_seconds: float = Field(default=5.0, gt=0, le=3600)


class Settings(LocalSettings, OperatorSettings, WorkerSettings, CommonSettings):
    """Every role's settings, as one ``analysisq`` process loads them."""


def parse_duration(text: str) -> dt.timedelta:
    """``6h``, ``90m``, ``1d12h``, ``45s`` (``--deadline-in``, ``--older-than``), or
    ConfigError."""
    match = _DURATION.match(text)
    if not text or match is None:
        raise ConfigError(f"invalid duration {text!r}: expected e.g. 6h, 90m, 1d12h")
    days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
    delta = dt.timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)
    if delta <= dt.timedelta(0):
        raise ConfigError(f"invalid duration {text!r}: it must be longer than zero")
    return delta


def parse_day(text: str) -> dt.date:
    """A ``YYYY-MM-DD`` date (``--date``), or ConfigError."""
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        try:
            return dt.date.fromisoformat(text)
        except ValueError:
            pass
    raise ConfigError(f"invalid date {text!r}: expected YYYY-MM-DD (a UTC day)")


def check_prefix(prefix: str) -> str:
    """``prefix`` if ``<prefix>-YYYYMMDD`` is a valid AnalysisRun name, else ConfigError."""
    if not _PREFIX.match(prefix):
        raise ConfigError(
            f"invalid run name prefix {prefix!r}: use lowercase letters, digits and '-', "
            "starting and ending with a letter or digit"
        )
    if len(prefix) + len("-YYYYMMDD") > MAX_RUN_NAME:
        raise ConfigError(
            f"run name prefix {prefix!r} is too long: at most {MAX_RUN_NAME - 9} characters"
        )
    return prefix


def _checked(parse: Any, value: Any) -> Any:
    """*value* through *parse* when it is text; a ConfigError becomes the field's error."""
    if not isinstance(value, str):
        return value
    try:
        return parse(value)
    except ConfigError as exc:
        raise ValueError(exc.message) from None


class TriggerSettings(BaseSettings):
    """``analysisq trigger`` (the chart's CronJob): flags, or ``ANALYSISQ_TRIGGER_*``."""

    model_config = SettingsConfigDict(env_prefix="ANALYSISQ_TRIGGER_", extra="forbid")

    #: Where the run and its template live; unset = the pod's or kubeconfig's namespace.
    namespace: str | None = Field(default=None, min_length=1)
    #: The ConfigMap holding the run template.
    template_configmap: str = Field(min_length=1)
    #: Its key: YAML, a bare spec or an AnalysisRun manifest.
    template_key: str = Field(default="spec.yaml", min_length=1)
    #: Runs are named ``<prefix>-YYYYMMDD`` and labelled ``analysisq.io/trigger=<prefix>``.
    prefix: str = "daily"
    #: The UTC day to create the run for (a backfill); unset = today.
    date: dt.date | None = None
    #: Finished runs of this prefix to keep; older finished ones are deleted.
    keep: int = Field(default=30, ge=0, le=100_000)
    #: Delete nothing.
    no_prune: bool = False
    #: Set ``spec.deadline`` this long after now, replacing the template's.
    deadline_in: dt.timedelta | None = None

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        return str(_checked(check_prefix, value))

    @field_validator("date", mode="before")
    @classmethod
    def _date(cls, value: Any) -> Any:
        return _checked(parse_day, value)

    @field_validator("deadline_in", mode="before")
    @classmethod
    def _deadline_in(cls, value: Any) -> Any:
        return _checked(parse_duration, value)


S = TypeVar("S", bound=BaseSettings)


def load(model: type[S], overrides: Mapping[str, object], *, flags: bool = False) -> S:
    """*model* from the environment plus explicit *overrides* (CLI flags), or ConfigError
    naming each bad field by its environment variable (and by its flag, with *flags*: every
    field of *model* is a flag of the same name)."""
    clean: dict[str, Any] = {k: v for k, v in overrides.items() if v is not None}
    prefix = model.model_config.get("env_prefix", "")
    try:
        return model(**clean)
    except ValidationError as exc:
        problems = []
        for e in exc.errors():
            field = ".".join(str(p) for p in e["loc"])
            where = f"{prefix}{field.upper()}"
            if flags:
                where += f" (--{field.replace('_', '-')})"
            problems.append(f"{where}: {e['msg']}")
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None


def load_settings(**overrides: object) -> Settings:
    """``Settings`` from the environment plus explicit overrides (CLI flags), or ConfigError."""
    return load(Settings, overrides)

"""Process configuration, validated once at start-up.

One pydantic-settings model; every field can be set by the environment with the prefix
``ANALYSISQ_`` (``ANALYSISQ_DATABASE_URL``; the bare ``DATABASE_URL`` is honoured too) and by
the CLI flag of the same name. What a run does lives in its spec (``analysisq.spec``); this is
how a process runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from analysisq.errors import ConfigError


def _default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "analysisq"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ANALYSISQ_", extra="forbid")

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

    #: Seconds a worker sleeps when nothing is claimable (jittered).
    poll_seconds: float = Field(default=0.5, gt=0, le=60)
    #: First retry backoff ceiling; doubles per attempt (full jitter).
    retry_base_seconds: float = Field(default=2.0, ge=0, le=3600)
    retry_cap_seconds: float = Field(default=300.0, ge=0, le=86_400)
    #: 429s an item may take without burning an attempt.
    max_deferrals: int = Field(default=20, ge=0, le=1000)
    #: On SIGTERM, in-flight items get this long to finish before they are released.
    shutdown_grace_seconds: float = Field(default=20.0, ge=0, le=3600)
    #: Database pool size per worker process.
    pool_size: int = Field(default=4, ge=2, le=100)

    # --- the operator (``analysisq operator``; see docs/operator.md) -------------------------
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
    #: Seconds between two stuck-item resets per run (the design: hourly at the latest).
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

    # -- local runs (``analysisq run`` / ``demo``) and prompt import ------------------------
    #: Import refuses prompts longer than this many characters.
    max_prompt_chars: int = Field(default=100_000, ge=1, le=10_000_000)
    #: Prompts written per statement by the import.
    import_batch_size: int = Field(default=1000, ge=1, le=100_000)
    #: How often ``analysisq run`` resets stuck items itself (workers also do, every lease).
    rescue_interval_seconds: float = Field(default=30.0, gt=0, le=3600)
    #: Worker processes ``analysisq run`` may restart after unexpected exits before giving up.
    max_worker_restarts: int = Field(default=100, ge=0, le=100_000)
    #: Seconds between progress lines when the output is not a terminal.
    progress_interval_seconds: float = Field(default=5.0, gt=0, le=3600)


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment plus explicit overrides (CLI flags), or ConfigError."""
    clean = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**clean)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = [
            f"ANALYSISQ_{'.'.join(str(p) for p in e['loc']).upper()}: {e['msg']}"
            for e in exc.errors()
        ]
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None

"""The AnalysisRun spec: one pydantic model for the CRD, the CLI's YAML and the database.

Field names are the CRD's (camelCase) on the wire and snake_case in Python. The CRD schema in
``crds/`` states the same rules for `kubectl apply`; this model is what every entry point
(operator handler, ``analysisq run``, ``analysisq worker``) validates with, so a spec that the
API server accepted and one read from a YAML file mean the same thing.
"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from analysisq.errors import SpecError

Provider = Literal["openai", "anthropic", "http", "echo"]
PROVIDERS: tuple[str, ...] = ("openai", "anthropic", "http", "echo")
Mode = Literal["sync", "batch"]
#: Providers whose asynchronous Batch API ``mode: batch`` drives.
BATCH_PROVIDERS: tuple[str, ...] = ("openai", "anthropic")
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class SecretKeyRef(_Model):
    """A key of a Kubernetes Secret in the run's namespace."""

    name: str = Field(min_length=1, max_length=253)
    key: str = Field(min_length=1, max_length=253)


#: A number in a price or budget: JSON numbers only ("1.5" as a string is refused, as the
#: CRD's ``type: number`` refuses it).
Number = Annotated[float, Strict()]


def _dns_label(v: str) -> str:
    if not _NAME.match(v):
        raise ValueError("must be a DNS label: lowercase letters, digits and '-'")
    return v


class RateLimit(_Model):
    """Aggregate limits for one target across every worker, or across a shared ``pool``."""

    requests_per_second: float | None = Field(default=None, gt=0, le=100_000)
    tokens_per_minute: int | None = Field(default=None, gt=0)
    #: Targets naming the same pool share one limit across every run of the database (the
    #: provider limits an API key, not a run). Without it the target has its own limit.
    pool: str | None = Field(default=None, min_length=1, max_length=63)

    @field_validator("pool")
    @classmethod
    def _pool_label(cls, v: str | None) -> str | None:
        return None if v is None else _dns_label(v)


class Pricing(_Model):
    """What a target's provider charges, per million tokens (no price list ships as truth)."""

    input_per_million_tokens: Number = Field(ge=0)
    output_per_million_tokens: Number = Field(ge=0)
    #: Share taken off by the provider's Batch API (``mode: batch``); 0.5 at OpenAI and
    #: Anthropic.
    batch_discount: Number = Field(default=0.5, ge=0, le=1)


class Budget(_Model):
    """What a run may spend; it pauses (``BudgetExhausted``) before a request could exceed it."""

    max_cost: Number | None = Field(default=None, gt=0)
    max_tokens: int | None = Field(default=None, gt=0, strict=True)

    @model_validator(mode="after")
    def _something(self) -> Budget:
        if self.max_cost is None and self.max_tokens is None:
            raise ValueError("set maxCost, maxTokens or both")
        return self


class BatchOptions(_Model):
    """How a ``mode: batch`` target fills its provider batches (the provider's own limits
    are the ceilings: OpenAI 50,000 requests / 200 MB per file, Anthropic 100,000 / 256 MB)."""

    #: Most requests in one provider batch.
    max_requests: int = Field(default=50_000, ge=1, le=100_000)
    #: Most bytes of one batch's input (OpenAI's JSONL file, Anthropic's request body).
    max_bytes: int = Field(default=200_000_000, ge=1_000, le=256_000_000)
    #: Seconds between two polls of an open batch.
    poll_seconds: float = Field(default=30.0, ge=0.05, le=3600)


class Target(_Model):
    """Where a prompt is sent: a provider, a model and its parameters."""

    name: str = Field(min_length=1, max_length=63)
    provider: Provider
    model: str = Field(min_length=1, max_length=200)
    endpoint: str | None = Field(default=None, max_length=2048)
    api_key_secret_ref: SecretKeyRef | None = None
    #: Local runs: the environment variable holding the API key (never the key itself).
    api_key_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    rate_limit: RateLimit | None = None
    pricing: Pricing | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    timeout_seconds: float = Field(default=60.0, gt=0, le=3600)
    #: ``sync``: one request per item; ``batch``: the provider's Batch API (half the price,
    #: answers within 24 h), openai and anthropic only.
    mode: Mode = "sync"
    #: Limits and polling of ``mode: batch``.
    batch: BatchOptions = Field(default_factory=BatchOptions)

    @field_validator("name")
    @classmethod
    def _name_label(cls, v: str) -> str:
        return _dns_label(v)

    @field_validator("endpoint")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://[^\s]+$", v):
            raise ValueError("must be an http:// or https:// URL")
        return v

    @model_validator(mode="after")
    def _endpoint_needed(self) -> Target:
        if self.provider == "http" and not self.endpoint:
            raise ValueError("provider 'http' needs an endpoint")
        if self.mode == "batch" and self.provider not in BATCH_PROVIDERS:
            raise ValueError(
                f"mode 'batch' needs a provider with a Batch API (openai or anthropic); "
                f"provider {self.provider!r} has none: use mode 'sync'"
            )
        if self.mode == "batch" and self.provider == "openai" and self.batch.max_requests > 50_000:
            raise ValueError("batch.maxRequests: OpenAI takes at most 50000 requests per batch")
        return self


class PromptSelector(_Model):
    """Which stored prompts the run analyses; empty means every active prompt."""

    # Bounded because the CRD must bound them for its CEL rules (prompts cannot change).
    tags: list[Annotated[str, StringConstraints(min_length=1, max_length=200)]] = Field(
        default_factory=list, max_length=100
    )
    ids: list[Annotated[str, StringConstraints(min_length=1, max_length=512)]] = Field(
        default_factory=list, max_length=10_000
    )


#: A Kubernetes resource quantity ("100m", "128Mi", 2), as the API server's pattern says.
QUANTITY = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
Quantity = int | Annotated[str, StringConstraints(pattern=QUANTITY)]


class WorkerResources(_Model):
    """CPU and memory of each worker container (operator only; local runs ignore it)."""

    requests: dict[str, Quantity] = Field(default_factory=dict, max_length=10)
    limits: dict[str, Quantity] = Field(default_factory=dict, max_length=10)


OnDelete = Literal["Keep", "Delete"]


class AnalysisRunSpec(_Model):
    """What one run does. Defaults are the seed's (NUM_WORKERS=20, BATCH_SIZE=5, 3 attempts)."""

    prompts: PromptSelector = Field(default_factory=PromptSelector)
    targets: list[Target] = Field(min_length=1, max_length=50)
    workers: int = Field(default=20, ge=0, le=1000)
    batch_size: int = Field(default=5, ge=1, le=1000)
    max_attempts: int = Field(default=3, ge=1, le=20)
    lease_seconds: int = Field(default=60, ge=5, le=3600)
    #: A processing item whose lease expired is stuck; this is the seed's 10-15 minute net
    #: kept as a second condition for rows written without a lease.
    stuck_after_seconds: int = Field(default=900, ge=30, le=86_400)
    max_lease_losses: int = Field(default=3, ge=1, le=20)
    #: The circuit breaker: this many answers in a row with the same target-wide permanent
    #: error (a misspelt model, a wrong endpoint path) and no success pause the target, and
    #: the items they failed are given back.
    target_fault_threshold: int = Field(default=3, ge=1, le=100)
    #: Fraction of items allowed to fail for good before the run is Failed (seed: < 1%).
    max_failed_ratio: float = Field(default=0.01, ge=0, le=1)
    max_prompt_chars: int = Field(default=100_000, ge=1, le=10_000_000)
    suspend: bool = False
    deadline: datetime | None = None
    database_secret_ref: SecretKeyRef | None = None
    on_delete: OnDelete = "Keep"
    #: Worker pod resources in a cluster; the operator's defaults when unset.
    resources: WorkerResources | None = None
    budget: Budget | None = None

    @model_validator(mode="after")
    def _unique_targets(self) -> AnalysisRunSpec:
        names = [t.name for t in self.targets]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"target names must be unique; repeated: {', '.join(dupes)}")
        return self

    @model_validator(mode="after")
    def _one_limit_per_pool(self) -> AnalysisRunSpec:
        seen: dict[str, tuple[int, RateLimit]] = {}
        for i, t in enumerate(self.targets):
            rl = t.rate_limit
            if rl is None or rl.pool is None:
                continue
            first = seen.setdefault(rl.pool, (i, rl))
            if (first[1].requests_per_second, first[1].tokens_per_minute) != (
                rl.requests_per_second,
                rl.tokens_per_minute,
            ):
                raise ValueError(
                    f"targets.{i}.rateLimit: pool {rl.pool!r} has other limits in "
                    f"targets.{first[0]}.rateLimit; every target of a pool states the same "
                    "requestsPerSecond and tokensPerMinute"
                )
        return self

    @model_validator(mode="after")
    def _cost_budget_needs_prices(self) -> AnalysisRunSpec:
        if self.budget is not None and self.budget.max_cost is not None:
            unpriced = [t.name for t in self.targets if t.pricing is None]
            if unpriced:
                raise ValueError(
                    "budget.maxCost needs targets[].pricing on every target; "
                    f"without pricing: {', '.join(unpriced)}"
                )
        return self

    def target(self, name: str) -> Target:
        for t in self.targets:
            if t.name == name:
                return t
        raise SpecError(f"unknown target {name!r}; the run has {[t.name for t in self.targets]}")

    def to_json(self) -> dict[str, Any]:
        """The spec as the CRD spells it, defaults included."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def parse_spec(data: Any, *, source: str = "spec") -> AnalysisRunSpec:
    """Validate *data* into a spec, or raise ``SpecError`` naming every wrong field."""
    try:
        return AnalysisRunSpec.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "(root)"
            problems.append(f"{where}: {err['msg']}")
        raise SpecError(f"invalid {source}: " + "; ".join(problems)) from None


def spec_mapping(data: Any, *, source: str) -> dict[str, Any]:
    """The spec in parsed YAML: a bare spec, or an AnalysisRun manifest's ``spec``."""
    if isinstance(data, dict) and data.get("kind") == "AnalysisRun":
        data = data.get("spec")
    if not isinstance(data, dict):
        raise SpecError(
            f"{source}: expected a mapping of AnalysisRun spec fields "
            "(a YAML mapping: a bare spec or a manifest's spec)"
        )
    return data


def read_spec_data(path: Path) -> dict[str, Any]:
    """The spec mapping of a YAML file: a bare spec or an AnalysisRun manifest's ``spec``."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise SpecError(f"cannot read {path}: {exc}") from None
    return spec_mapping(data, source=str(path))


def load_spec_file(path: Path) -> AnalysisRunSpec:
    """Read and validate a spec from YAML (a bare spec or a whole AnalysisRun manifest)."""
    return parse_spec(read_spec_data(path), source=str(path))

"""The spec of a local run, from a YAML file, from flags, or both (flags win).

The YAML holds the same fields as an AnalysisRun's ``spec`` (or a whole AnalysisRun
manifest); flags use the same names in kebab case. ``--target`` is the short form of one
target: ``NAME=PROVIDER:MODEL[@ENDPOINT]``. Whatever the source, the result is validated by
``analysisq.spec.parse_spec``, the model the operator uses too.
"""

from __future__ import annotations

import re
import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic.alias_generators import to_camel

from analysisq.errors import SpecError
from analysisq.spec import PROVIDERS, AnalysisRunSpec, parse_spec, read_spec_data

_TARGET = re.compile(
    r"^(?:(?P<name>[^=\s]+)=)?(?P<provider>[a-z]+):(?P<model>[^\s@]+(?:@(?!https?://)[^\s@]+)*)"
    r"(?:@(?P<endpoint>https?://\S+))?$"
)


def parse_target(value: str) -> dict[str, Any]:
    """``NAME=PROVIDER:MODEL[@ENDPOINT]`` as a spec target (NAME defaults to the model's)."""
    m = _TARGET.match(value.strip())
    if not m or m["provider"] not in PROVIDERS:
        raise SpecError(
            f"--target {value!r}: expected NAME=PROVIDER:MODEL[@ENDPOINT] with PROVIDER one of "
            f"{', '.join(PROVIDERS)}, e.g. gpt=openai:gpt-4o-mini"
        )
    name = m["name"] or re.sub(r"[^a-z0-9]+", "-", m["model"].lower()).strip("-")[:63]
    target: dict[str, Any] = {"name": name, "provider": m["provider"], "model": m["model"]}
    if m["endpoint"]:
        target["endpoint"] = m["endpoint"]
    return target


_BUDGET_KEYS = {"maxCost": float, "maxTokens": int}


def parse_budget(values: list[str]) -> dict[str, Any] | None:
    """``--budget maxCost=5,maxTokens=2000000`` (repeatable) as the spec's ``budget``."""
    budget: dict[str, Any] = {}
    for value in values:
        for part in filter(None, (p.strip() for p in value.split(","))):
            key, sep, number = part.partition("=")
            kind = _BUDGET_KEYS.get(key.strip())
            try:
                if not sep or kind is None:
                    raise ValueError
                budget[key.strip()] = kind(number.strip())
            except ValueError:
                raise SpecError(
                    f"--budget {value!r}: expected maxCost=NUMBER and/or maxTokens=INTEGER, "
                    "e.g. --budget maxCost=25,maxTokens=5000000"
                ) from None
    return budget or None


def with_fixed_targets(spec: AnalysisRunSpec, values: list[str]) -> AnalysisRunSpec:
    """*spec* with its targets of the same names corrected by ``--target`` values.

    How a resumed run gets the model or endpoint that its circuit breaker said to fix; the
    rest of each target (rate limit, key variable, params) stays. The queue refuses a model
    change for a target that already has results (``runs.create_run``)."""
    data = spec.to_json()
    by_name = {t["name"]: t for t in data["targets"]}
    for value in values:
        fix = parse_target(value)
        if fix["name"] not in by_name:
            raise SpecError(
                f"--target {value!r}: the run has no target {fix['name']!r} (it has "
                f"{', '.join(by_name)}); a resumed run keeps its targets, NAME= picks one"
            )
        by_name[fix["name"]].update(fix)
    return parse_spec(data, source="the resumed run's targets")


def build_spec(
    spec_file: Path | None,
    targets: list[str],
    *,
    tags: list[str] | None = None,
    requests_per_second: float | None = None,
    tokens_per_minute: int | None = None,
    timeout_seconds: float | None = None,
    api_key_env: str | None = None,
    budget: dict[str, Any] | None = None,
    **fields: Any,
) -> AnalysisRunSpec:
    """Merge the YAML file and the flags into one validated spec.

    *fields* are top-level spec fields in snake case (``workers``, ``batch_size``...; ``None``
    means not given). ``--target`` flags replace the file's targets; the per-target flags
    (rate limits, timeout, API key variable) apply to every target.
    """
    data: dict[str, Any] = read_spec_data(spec_file) if spec_file else {}
    if targets:
        data["targets"] = [parse_target(t) for t in targets]
    if not data.get("targets"):
        raise SpecError("no target: give --target NAME=PROVIDER:MODEL[@ENDPOINT] or --spec FILE")
    data.update({to_camel(k): v for k, v in fields.items() if v is not None})
    if tags:
        data["prompts"] = {**(data.get("prompts") or {}), "tags": list(tags)}
    if budget:
        data["budget"] = budget
    overrides = _given(timeoutSeconds=timeout_seconds, apiKeyEnv=api_key_env)
    limits = _given(requestsPerSecond=requests_per_second, tokensPerMinute=tokens_per_minute)
    data["targets"] = [_with_flags(t, overrides, limits) for t in data["targets"]]
    return parse_spec(data, source=str(spec_file) if spec_file else "run options")


def _given(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def _with_flags(target: Any, overrides: dict[str, Any], limits: dict[str, Any]) -> Any:
    if not isinstance(target, dict):
        return target  # parse_spec names the problem
    out = {**target, **overrides}
    if limits:
        out["rateLimit"] = {**(out.get("rateLimit") or {}), **limits}
    return out


def new_run_id(name: str) -> str:
    """``NAME-YYYYMMDD-HHMMSS-xxxx``: sortable, readable, and unique enough for local runs."""
    return f"{name}-{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"

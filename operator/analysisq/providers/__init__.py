"""Providers: send one prompt to one target and get a ``Completion`` or a typed error.

The worker builds one ``httpx.AsyncClient`` per process with ``make_http_client``, resolves
each target's key once with ``resolve_api_key`` and asks ``make_provider`` for the target's
provider; then it calls ``await provider.complete(prompt)`` per item. A ``mode: batch``
target gets ``make_batch_client`` instead (``batch``: the contract; ``openai_batch``,
``anthropic_batch``: one Batch API each), over the same provider and client. Modules, in the order a
request travels: ``base`` (the contract), ``openai`` / ``anthropic`` / ``http`` / ``echo``
(one API each), ``client`` (the shared HTTP pipeline), ``http_errors`` (status → error).

API keys are looked up, in order:

1. ``target.apiKeyEnv``, when the spec names a variable (an error if it is unset);
2. ``ANALYSISQ_API_KEY_<TARGET>`` (the target name upper-cased, ``-`` → ``_``);
3. the file named by ``ANALYSISQ_API_KEY_FILE_<TARGET>`` (a mounted Secret; the operator
   mounts ``apiKeySecretRef`` this way);
4. none: allowed for local OpenAI-compatible servers, refused for the public OpenAI and
   Anthropic endpoints.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import httpx

from analysisq.completion import Completion
from analysisq.errors import ConfigError
from analysisq.providers.anthropic import DEFAULT_ENDPOINT as ANTHROPIC_ENDPOINT
from analysisq.providers.anthropic import AnthropicProvider
from analysisq.providers.anthropic_batch import AnthropicBatchClient
from analysisq.providers.base import Provider
from analysisq.providers.batch import BatchClient
from analysisq.providers.client import USER_AGENT, make_http_client
from analysisq.providers.echo import EchoProvider
from analysisq.providers.http import HttpProvider
from analysisq.providers.openai import DEFAULT_ENDPOINT as OPENAI_ENDPOINT
from analysisq.providers.openai import OpenAIProvider
from analysisq.providers.openai_batch import OpenAIBatchClient
from analysisq.providers.telemetry import traced
from analysisq.spec import Target

__all__ = [
    "USER_AGENT",
    "BatchClient",
    "Completion",
    "Provider",
    "api_key_env_names",
    "api_key_variable",
    "make_batch_client",
    "make_http_client",
    "make_provider",
    "resolve_api_key",
]

_PUBLIC_HOSTS = {
    "openai": httpx.URL(OPENAI_ENDPOINT).host,
    "anthropic": httpx.URL(ANTHROPIC_ENDPOINT).host,
}


def make_provider(target: Target, client: httpx.AsyncClient, api_key: str | None) -> Provider:
    """The provider for *target*, sending over *client* with *api_key*; with a span per call
    when OpenTelemetry is configured (``analysisq.providers.telemetry``).

    Raises ``ConfigError`` naming the target when the provider cannot work as configured,
    e.g. no key for the public OpenAI or Anthropic API.
    """
    return traced(_untraced_provider(target, client, api_key))


def _untraced_provider(target: Target, client: httpx.AsyncClient, api_key: str | None) -> Provider:
    public = _PUBLIC_HOSTS.get(target.provider)
    if public and not api_key:
        host = httpx.URL(target.endpoint).host if target.endpoint else public
        if host == public:
            names = " or ".join(api_key_env_names(target))
            raise ConfigError(
                f"target {target.name!r}: {target.provider} at {host} needs an API key "
                f"(set {names}, or apiKeySecretRef in the run)"
            )
    if target.provider == "openai":
        return OpenAIProvider(target, client, api_key)
    if target.provider == "anthropic":
        return AnthropicProvider(target, client, api_key)
    if target.provider == "http":
        return HttpProvider(target, client, api_key)
    return EchoProvider(target)


def make_batch_client(
    target: Target, client: httpx.AsyncClient, api_key: str | None
) -> BatchClient:
    """The Batch API client of a ``mode: batch`` *target*: over the same provider (request
    builder, answer parser, key checks) and the same shared *client* as the sync path."""
    provider = make_provider(target, client, api_key)
    if isinstance(provider, OpenAIProvider):
        return OpenAIBatchClient(provider, client, api_key)
    if isinstance(provider, AnthropicProvider):
        return AnthropicBatchClient(provider, client, api_key)
    raise ConfigError(f"target {target.name!r}: provider {target.provider!r} has no Batch API")


def resolve_api_key(target: Target, environ: Mapping[str, str] = os.environ) -> str | None:
    """*target*'s API key from the environment or a mounted file, or ``None`` if it has none.

    Errors name the variable or file, never the value.
    """
    if target.api_key_env:
        value = environ.get(target.api_key_env, "").strip()
        if not value:
            raise ConfigError(
                f"target {target.name!r}: environment variable {target.api_key_env} "
                "(apiKeyEnv) is not set"
            )
        return value
    key_var, file_var = api_key_env_names(target)
    value = environ.get(key_var, "").strip()
    if value:
        return value
    path = environ.get(file_var, "").strip()
    if not path:
        return None
    try:
        value = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ConfigError(
            f"target {target.name!r}: cannot read the API key file {path} ({file_var}): {reason}"
        ) from None
    if not value:
        raise ConfigError(f"target {target.name!r}: the API key file {path} ({file_var}) is empty")
    return value


def api_key_variable(target: Target) -> str:
    """The variable a worker reads *target*'s key from first: ``apiKeyEnv`` when the spec
    names one, else ``ANALYSISQ_API_KEY_<NAME>`` (where the operator and ``analysisq run``
    put a key they pass on)."""
    return target.api_key_env or api_key_env_names(target)[0]


def api_key_env_names(target: Target) -> tuple[str, str]:
    """The variables that hold *target*'s key and its key file, e.g. for a Deployment."""
    suffix = target.name.upper().replace("-", "_")
    return f"ANALYSISQ_API_KEY_{suffix}", f"ANALYSISQ_API_KEY_FILE_{suffix}"

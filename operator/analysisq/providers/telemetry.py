"""Optional OpenTelemetry traces: one span per provider call, GenAI semantic conventions.

Off unless ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set (and the ``otel`` extra installed): then
``providers.make_provider`` wraps each provider in ``TracedProvider`` and spans go over OTLP
HTTP, configured by the standard ``OTEL_*`` variables (service name, headers, sampling).
Unset, ``traced`` returns the provider itself: no import, no cost.

A span is named ``chat {model}`` and carries ``gen_ai.operation.name``, ``gen_ai.system``
(and its newer name ``gen_ai.provider.name``), ``gen_ai.request.model``,
``gen_ai.response.model``, ``gen_ai.usage.input_tokens`` / ``output_tokens``,
``server.address`` / ``server.port`` and, on failure, ``error.type`` (the analysisq error
class). Prompts and answers are never recorded (the conventions make them opt-in).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from functools import cache
from typing import TYPE_CHECKING, Any

import httpx

from analysisq.errors import ProviderError

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Tracer

    from analysisq.completion import Completion
    from analysisq.providers.base import Provider

log = logging.getLogger(__name__)

#: gen_ai.system values the conventions define for our provider kinds.
_SYSTEMS = {"openai": "openai", "anthropic": "anthropic"}


@cache
def configured_tracer() -> Tracer | None:
    """The process's tracer exporting over OTLP, or None when tracing is not configured."""
    provider = tracer_provider_from_env(os.environ)
    return None if provider is None else provider.get_tracer("analysisq")


def tracer_provider_from_env(environ: Mapping[str, str]) -> TracerProvider | None:
    """An SDK tracer provider exporting to the OTLP/HTTP endpoint that *environ* names."""
    endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if not endpoint and environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        endpoint = environ["OTEL_EXPORTER_OTLP_ENDPOINT"].rstrip("/") + "/v1/traces"
    if not endpoint:
        return None
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning("OTEL_EXPORTER_OTLP_ENDPOINT is set but the otel extra is not installed")
        return None
    resource = Resource.create({"service.name": environ.get("OTEL_SERVICE_NAME", "analysisq")})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    return provider


def traced(provider: Provider, tracer: Tracer | None = None) -> Provider:
    """*provider* with a span per call when tracing is configured, else *provider* itself."""
    tracer = tracer or configured_tracer()
    return provider if tracer is None else TracedProvider(provider, tracer)


class TracedProvider:
    """A provider whose every ``complete`` is a GenAI client span."""

    def __init__(self, inner: Provider, tracer: Tracer) -> None:
        self._inner = inner
        self._tracer = tracer
        self.target = inner.target

    def _attributes(self) -> dict[str, Any]:
        t = self.target
        system = _SYSTEMS.get(t.provider, t.provider)
        attrs: dict[str, Any] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.system": system,
            "gen_ai.provider.name": system,
            "gen_ai.request.model": t.model,
            "analysisq.target": t.name,
        }
        if t.endpoint:
            url = httpx.URL(t.endpoint)
            attrs["server.address"] = url.host
            if url.port:
                attrs["server.port"] = url.port
        return attrs

    async def complete(self, prompt: str) -> Completion:
        from opentelemetry.trace import SpanKind, Status, StatusCode

        with self._tracer.start_as_current_span(
            f"chat {self.target.model}",
            kind=SpanKind.CLIENT,
            attributes=self._attributes(),
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                completion = await self._inner.complete(prompt)
            except ProviderError as exc:
                # The class and our own (redacted) message; never the prompt.
                span.set_attribute("error.type", exc.error_class.value)
                span.set_status(Status(StatusCode.ERROR, exc.message))
                raise
            except Exception as exc:
                span.set_attribute("error.type", type(exc).__qualname__)
                span.set_status(Status(StatusCode.ERROR))
                raise
            span.set_attribute("gen_ai.response.model", completion.model)
            if completion.tokens_in is not None:
                span.set_attribute("gen_ai.usage.input_tokens", completion.tokens_in)
            if completion.tokens_out is not None:
                span.set_attribute("gen_ai.usage.output_tokens", completion.tokens_out)
            return completion

"""Traces of provider calls: GenAI-convention spans when OTLP is configured, none otherwise.

One test records spans in memory; one sends them over real OTLP/HTTP to an in-process
receiver (aiohttp on 127.0.0.1) and decodes the protobuf it got.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from analysisq.errors import PermanentError
from analysisq.fake_provider import FakeConfig, FakeProvider
from analysisq.providers import make_http_client, make_provider
from analysisq.providers.openai import OpenAIProvider
from analysisq.providers.telemetry import configured_tracer, traced, tracer_provider_from_env
from analysisq.spec import Target

pytestmark = pytest.mark.unit


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with make_http_client() as c:
        yield c


def target(url: str) -> Target:
    return Target(name="cheap", provider="openai", model="gpt-4o-mini", endpoint=url)


async def test_nothing_without_an_endpoint(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert tracer_provider_from_env({}) is None
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    configured_tracer.cache_clear()
    try:
        provider = make_provider(target("http://127.0.0.1:1/v1"), client, None)
        assert isinstance(provider, OpenAIProvider)
    finally:
        configured_tracer.cache_clear()


async def test_a_span_per_call_with_genai_attributes(client: httpx.AsyncClient) -> None:
    exporter = InMemorySpanExporter()
    tp = TracerProvider()
    tp.add_span_processor(SimpleSpanProcessor(exporter))
    async with (
        FakeProvider(FakeConfig(errors={})) as ok,
        FakeProvider(FakeConfig(errors={"400": 1.0})) as refusing,
    ):
        good = traced(OpenAIProvider(target(ok.url), client, None), tp.get_tracer("t"))
        bad = traced(OpenAIProvider(target(refusing.url), client, None), tp.get_tracer("t"))
        completion = await good.complete("a secret prompt")
        with pytest.raises(PermanentError):
            await bad.complete("another secret prompt")
    ok_span, bad_span = exporter.get_finished_spans()
    assert ok_span.name == "chat gpt-4o-mini"
    attrs = dict(ok_span.attributes or {})
    assert attrs["gen_ai.system"] == "openai" and attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.request.model"] == "gpt-4o-mini"
    assert attrs["gen_ai.usage.input_tokens"] == completion.tokens_in
    assert attrs["gen_ai.usage.output_tokens"] == completion.tokens_out
    assert attrs["server.address"] == "127.0.0.1"
    assert bad_span.status.status_code == StatusCode.ERROR
    assert dict(bad_span.attributes or {})["error.type"] == "permanent"
    for span in (ok_span, bad_span):
        values = " ".join(str(v) for v in (span.attributes or {}).values())
        assert "secret prompt" not in values and "secret prompt" not in str(span.status)


async def test_spans_reach_an_otlp_receiver(client: httpx.AsyncClient) -> None:
    got: list[ExportTraceServiceRequest] = []

    async def receive(request: web.Request) -> web.Response:
        message = ExportTraceServiceRequest()
        message.ParseFromString(await request.read())
        got.append(message)
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/v1/traces", receive)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        tp = tracer_provider_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}"})
        assert tp is not None
        async with FakeProvider(FakeConfig()) as fake:
            provider = traced(OpenAIProvider(target(fake.url), client, None), tp.get_tracer("t"))
            await provider.complete("hello")
        assert await asyncio.to_thread(tp.force_flush)
    finally:
        await runner.cleanup()
    spans = [s for m in got for rs in m.resource_spans for ss in rs.scope_spans for s in ss.spans]
    assert [s.name for s in spans] == ["chat gpt-4o-mini"]
    names = {a.key for a in spans[0].attributes}
    assert {"gen_ai.system", "gen_ai.request.model", "gen_ai.usage.input_tokens"} <= names

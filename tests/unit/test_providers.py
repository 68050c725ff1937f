"""Providers against real servers: the fake provider, and small aiohttp stubs for the
Anthropic and generic HTTP shapes and for edge responses a real provider may send."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import socket
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web

from analysisq import __version__
from analysisq.errors import (
    AuthError,
    ConfigError,
    InvalidInput,
    PermanentError,
    ProviderError,
    RateLimited,
    TargetFault,
    TransientError,
)
from analysisq.fake_provider import FakeConfig, FakeProvider
from analysisq.providers import (
    Completion,
    Provider,
    make_http_client,
    make_provider,
    resolve_api_key,
)
from analysisq.providers.anthropic import AnthropicProvider
from analysisq.providers.base import parse_json_answer
from analysisq.providers.echo import EchoProvider
from analysisq.providers.http import HttpProvider
from analysisq.providers.http_errors import MAX_RETRY_AFTER_S, error_for_response, retry_delay
from analysisq.providers.openai import OpenAIProvider
from analysisq.spec import Target

pytestmark = pytest.mark.unit

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Stub:
    """An HTTP server answering every request with *handler*; remembers what it got."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[tuple[str, dict[str, str], Any]] = []
        self.url = ""

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw
        self.requests.append((request.path_qs, dict(request.headers), body))
        return await self.handler(request)


@contextlib.asynccontextmanager
async def stub_server(handler: Handler) -> AsyncIterator[Stub]:
    stub = Stub(handler)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", stub._handle)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=0.5)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        stub.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        yield stub
    finally:
        await runner.cleanup()


def reply(status: int = 200, body: Any = None, headers: dict[str, str] | None = None) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        text = body if isinstance(body, str) else json.dumps(body)
        return web.Response(
            status=status, text=text, content_type="application/json", headers=headers
        )

    return handler


def target(provider: str = "openai", endpoint: str | None = None, **kw: Any) -> Target:
    return Target.model_validate(
        {"name": "t-1", "provider": provider, "model": "m-1", "endpoint": endpoint, **kw}
    )


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with make_http_client(trust_env=False) as c:
        yield c


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


OPENAI_OK = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "model": "m-1-2024",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": '{"a": 1}'}}],
    "usage": {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14},
}
ANTHROPIC_OK = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "model": "claude-x",
    "content": [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world."}],
    "stop_reason": "end_turn",
    "usage": {"input_tokens": 9, "output_tokens": 4},
}


# --- success --------------------------------------------------------------------------------


async def test_openai_against_the_fake_provider(client: httpx.AsyncClient) -> None:
    async with FakeProvider(FakeConfig(require_api_key="sk-fake-123456")) as fake:
        provider = make_provider(target(endpoint=fake.url), client, "sk-fake-123456")
        prompt = "Rate the tone of this sentence, please."
        first = await provider.complete(prompt)
        second = await provider.complete(prompt)
        assert isinstance(first, Completion)
        assert first.text == second.text
        assert isinstance(first.parsed, dict)
        assert first.parsed["prompt_sha256"] == hashlib.sha256(prompt.encode()).hexdigest()
        assert first.model == "m-1"
        assert first.tokens_in == (len(prompt) + 3) // 4
        assert first.tokens_out == (len(first.text) + 3) // 4
        assert first.latency_ms > 0
        assert fake.prompt_counts(prompt).completions == 2


async def test_openai_request_shape_and_params(client: httpx.AsyncClient) -> None:
    async with stub_server(reply(200, OPENAI_OK)) as stub:
        t = target(
            endpoint=stub.url + "/v1/",
            params={"temperature": 0, "max_tokens": 50, "model": "other", "messages": []},
        )
        result = await make_provider(t, client, "sk-abcdef123456").complete("hi")
        path, headers, body = stub.requests[0]
    assert path == "/v1/chat/completions"
    assert headers["Authorization"] == "Bearer sk-abcdef123456"
    assert headers["User-Agent"] == f"analysisq/{__version__}"
    assert body == {
        "temperature": 0,
        "max_tokens": 50,
        "model": "m-1",
        "messages": [{"role": "user", "content": "hi"}],
    }
    assert result == Completion(
        '{"a": 1}', {"a": 1}, 11, 3, "m-1-2024", result.latency_ms, parsed_json='{"a": 1}'
    )


async def test_openai_compatible_server_without_key(client: httpx.AsyncClient) -> None:
    body = {"choices": [{"message": {"content": [{"type": "text", "text": "ok"}]}}]}
    async with stub_server(reply(200, body)) as stub:
        t = target(endpoint=stub.url + "/v1/chat/completions")
        result = await make_provider(t, client, None).complete("hi")
        azure = target(endpoint=stub.url + "/openai/deployments/d1?api-version=2024-06-01")
        await make_provider(azure, client, None).complete("hi")
        (path, headers, _), (azure_path, _, _) = stub.requests
    assert path == "/v1/chat/completions"
    assert azure_path == "/openai/deployments/d1/chat/completions?api-version=2024-06-01"
    assert "Authorization" not in headers
    assert (result.text, result.parsed, result.tokens_in, result.model) == ("ok", None, None, "m-1")


async def test_anthropic_request_and_response(client: httpx.AsyncClient) -> None:
    async with stub_server(reply(200, ANTHROPIC_OK)) as stub:
        t = target("anthropic", stub.url, params={"system": "Be brief.", "anthropic_version": "v9"})
        provider = make_provider(t, client, "ak-secret-000000")
        assert isinstance(provider, AnthropicProvider)
        result = await provider.complete("hello")
        t2 = target("anthropic", stub.url + "/v1", params={"max_tokens": 7})
        await make_provider(t2, client, "ak-secret-000000").complete("again")
        (path, headers, body), (path2, headers2, body2) = stub.requests
    assert path == path2 == "/v1/messages"
    assert headers["x-api-key"] == "ak-secret-000000"
    assert "Authorization" not in headers
    assert (headers["anthropic-version"], headers2["anthropic-version"]) == ("v9", "2023-06-01")
    assert body == {
        "system": "Be brief.",
        "max_tokens": 1024,
        "model": "m-1",
        "messages": [{"role": "user", "content": "hello"}],
    }
    assert body2["max_tokens"] == 7
    assert result.text == "Hello, world."
    assert (result.tokens_in, result.tokens_out, result.model) == (9, 4, "claude-x")


async def test_http_provider_response_path(client: httpx.AsyncClient) -> None:
    body = {"output": {"text": "[1, 2]", "items": [{"n": 1}]}}
    async with stub_server(reply(200, body)) as stub:
        t = target("http", stub.url + "/score", params={"responsePath": "output.text", "k": 1})
        first = await make_provider(t, client, "key-0123456789").complete("p")
        t = target(
            "http", stub.url, params={"responsePath": "output.items.0", "apiKeyHeader": "X-Key"}
        )
        second = await make_provider(t, client, "key-0123456789").complete("p")
        whole = await make_provider(target("http", stub.url), client, None).complete("p")
        (p1, h1, b1), (_, h2, _), (_, h3, _) = stub.requests
    assert (p1, b1) == ("/score", {"k": 1, "prompt": "p", "model": "m-1"})
    assert h1["Authorization"] == "Bearer key-0123456789"
    assert h2["X-Key"] == "key-0123456789" and "Authorization" not in h2
    assert "Authorization" not in h3
    assert (first.text, first.parsed) == ("[1, 2]", [1, 2])
    assert (second.text, second.parsed) == ('{"n": 1}', {"n": 1})
    assert json.loads(whole.text) == body and whole.parsed == body
    assert whole.tokens_in is None and whole.model == "m-1"


async def test_http_provider_missing_path_is_transient(client: httpx.AsyncClient) -> None:
    async with stub_server(reply(200, {"output": {}})) as stub:
        t = target("http", stub.url, params={"responsePath": "output.text"})
        with pytest.raises(TransientError, match=r"output\.text"):
            await make_provider(t, client, None).complete("p")


def _no_network(request: httpx.Request) -> httpx.Response:
    raise AssertionError("the echo provider must not use the network")


async def test_echo_is_deterministic_and_offline() -> None:
    async with httpx.AsyncClient(transport=httpx.MockTransport(_no_network)) as offline:
        provider = make_provider(target("echo"), offline, None)
        slow = make_provider(target("echo", params={"delayMs": 30}), offline, None)
        assert isinstance(provider, EchoProvider)
        a, b, c = [await provider.complete(p) for p in ("same", "same", "other")]
        timed = await slow.complete("same")
    assert a.text == b.text == timed.text != c.text
    assert a.parsed == json.loads(a.text)
    assert a.parsed["sha256"] == "0967115f2813a3541eaef77de9d9d5773f1c0c04314b0bbfe4ff3b3b1c55b5d5"
    assert a.parsed["chars"] == 4 and a.tokens_in == 1 and a.model == "m-1"
    # the documented answer, compact and in order; it is also the JSON text stored as parsed
    assert a.text == json.dumps(a.parsed, separators=(",", ":")) and a.parsed_json is a.text
    odd = await EchoProvider(target("echo", model='m "1" é\\')).complete("x")
    assert json.loads(odd.text) == odd.parsed and odd.parsed["model"] == 'm "1" é\\'
    assert timed.latency_ms >= 30


def test_parse_json_answer() -> None:
    # the decoded JSON and the text it was decoded from, which the results table stores
    assert parse_json_answer('```json\n{"a": [1]}\n```') == ({"a": [1]}, '{"a": [1]}')
    assert parse_json_answer(" [1, 2] ") == ([1, 2], "[1, 2]")
    assert parse_json_answer("42") == (None, None)
    assert parse_json_answer("{not json") == (None, None)
    assert parse_json_answer("plain words") == (None, None)


# --- error mapping --------------------------------------------------------------------------


def _in(seconds: float) -> str:
    return format_datetime(datetime.now(UTC) + timedelta(seconds=seconds), usegmt=True)


def _oai_error(
    message: str,
    type_: str = "invalid_request_error",
    code: str | None = None,
    param: str | None = None,
) -> Any:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _anthropic_error(type_: str, message: str) -> Any:
    return {"type": "error", "error": {"type": type_, "message": message}}


CASES: list[tuple[str, int, Any, dict[str, str], type[ProviderError], float | None]] = [
    ("429 seconds", 429, _oai_error("slow down", "requests"), {"Retry-After": "7"}, RateLimited, 7),
    ("429 date", 429, _oai_error("slow down"), {"Retry-After": "in 30s"}, RateLimited, 30),
    ("429 ms", 429, "{}", {"retry-after-ms": "1500", "Retry-After": "9"}, RateLimited, 1.5),
    ("429 bare", 429, _oai_error("slow down"), {}, RateLimited, None),
    (
        "429 x-ratelimit",
        429,
        "{}",
        {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "6m0s"},
        RateLimited,
        360,
    ),
    (
        "429 quota",
        429,
        _oai_error("You exceeded your current quota", "insufficient_quota", "insufficient_quota"),
        {},
        AuthError,
        None,
    ),
    ("401", 401, _oai_error("Incorrect API key", code="invalid_api_key"), {}, AuthError, None),
    ("403", 403, _anthropic_error("permission_error", "no"), {}, AuthError, None),
    ("400", 400, _oai_error("Unrecognized request argument: foo"), {}, PermanentError, None),
    (
        "404",
        404,
        _oai_error("The model does not exist", code="model_not_found"),
        {},
        TargetFault,
        None,
    ),
    ("404 path", 404, "404: Not Found", {}, TargetFault, None),
    (
        "400 invalid model",
        400,
        _oai_error("Invalid model name passed in model=gpt-mok.", code="400", param="model"),
        {},
        TargetFault,
        None,
    ),
    ("422", 422, "unprocessable", {}, PermanentError, None),
    (
        "400 context",
        400,
        _oai_error(
            "This model's maximum context length is 8192 tokens. However, your messages "
            "resulted in 8227 tokens.",
            code="context_length_exceeded",
        ),
        {},
        InvalidInput,
        None,
    ),
    (
        "400 vllm context",
        400,
        {
            "object": "error",
            "message": "This model's maximum context length is 4096 tokens.",
            "type": "BadRequestError",
            "code": 400,
        },
        {},
        InvalidInput,
        None,
    ),
    (
        "400 anthropic too long",
        400,
        _anthropic_error(
            "invalid_request_error", "prompt is too long: 210000 tokens > 200000 maximum"
        ),
        {},
        InvalidInput,
        None,
    ),
    (
        "400 content",
        400,
        _oai_error("flagged", code="content_policy_violation"),
        {},
        InvalidInput,
        None,
    ),
    ("413", 413, _anthropic_error("request_too_large", "too big"), {}, InvalidInput, None),
    ("408", 408, "timeout", {}, TransientError, None),
    ("409", 409, "conflict", {}, TransientError, None),
    ("500", 500, _oai_error("oops", "server_error"), {}, TransientError, None),
    ("502 html", 502, "<html>Bad Gateway</html>", {}, TransientError, None),
    ("503 retry-after", 503, "{}", {"Retry-After": "3"}, TransientError, 3),
    (
        "529 overloaded",
        529,
        _anthropic_error("overloaded_error", "Overloaded"),
        {},
        TransientError,
        None,
    ),
]


@pytest.mark.parametrize(
    ("status", "body", "headers", "error", "delay"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
async def test_status_mapping(
    client: httpx.AsyncClient,
    status: int,
    body: Any,
    headers: dict[str, str],
    error: type[ProviderError],
    delay: float | None,
) -> None:
    if headers.get("Retry-After") == "in 30s":  # an HTTP date, made when the test runs
        headers = {"Retry-After": _in(30)}
    async with stub_server(reply(status, body, headers)) as stub:
        for provider in ("openai", "anthropic", "http"):
            p = make_provider(target(provider, stub.url), client, "sk-abcdef123456")
            with pytest.raises(ProviderError) as caught:
                await p.complete("hi")
            assert type(caught.value) is error, caught.value
            assert caught.value.status == status
            assert f"HTTP {status} from 127.0.0.1:" in str(caught.value)
            if delay is None:
                assert getattr(caught.value, "delay", None) is None
            else:
                assert isinstance(caught.value, TransientError)
                assert caught.value.delay == pytest.approx(delay, abs=1.5)


def test_retry_delay_edge_cases() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    past = format_datetime(now - timedelta(seconds=5), usegmt=True)
    assert retry_delay({"Retry-After": past}, now=now) == 0
    assert retry_delay({"Retry-After": "soon"}, now=now) is None
    assert retry_delay({"Retry-After": "nan"}, now=now) is None
    assert retry_delay({"Retry-After": "1e9"}, now=now) == MAX_RETRY_AFTER_S
    assert retry_delay({"RETRY-AFTER-MS": "250"}, now=now) == 0.25
    assert (
        retry_delay(
            {
                "x-ratelimit-remaining-tokens": "0",
                "x-ratelimit-reset-tokens": "1m2.5s",
                "x-ratelimit-remaining-requests": "3",
                "x-ratelimit-reset-requests": "9s",
            },
            now=now,
        )
        == 62.5
    )
    assert retry_delay(
        {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "12ms"}, now=now
    ) == pytest.approx(0.012)
    reset = (now + timedelta(seconds=20)).isoformat().replace("+00:00", "Z")
    anthropic = {
        "anthropic-ratelimit-requests-remaining": "0",
        "anthropic-ratelimit-requests-reset": reset,
    }
    assert retry_delay(anthropic, now=now) == 20
    assert retry_delay({"x-ratelimit-remaining-requests": "5"}, now=now) is None


BAD_BODIES: list[tuple[str, str, Any, type[ProviderError]]] = [
    ("openai malformed", "openai", '{"choices": [', TransientError),
    ("openai not an object", "openai", "[]", TransientError),
    ("openai no choices", "openai", {"choices": []}, TransientError),
    (
        "openai null content",
        "openai",
        {"choices": [{"message": {"content": None}}]},
        TransientError,
    ),
    (
        "openai content filter",
        "openai",
        {"choices": [{"finish_reason": "content_filter", "message": {"content": ""}}]},
        InvalidInput,
    ),
    (
        "openai refusal",
        "openai",
        {"choices": [{"message": {"content": None, "refusal": "I can't help with that."}}]},
        InvalidInput,
    ),
    ("anthropic malformed", "anthropic", "not json at all", TransientError),
    ("anthropic no text", "anthropic", {"content": [{"type": "tool_use"}]}, TransientError),
    ("anthropic refusal", "anthropic", {"content": [], "stop_reason": "refusal"}, InvalidInput),
]


@pytest.mark.parametrize(
    ("provider", "body", "error"), [c[1:] for c in BAD_BODIES], ids=[c[0] for c in BAD_BODIES]
)
async def test_bad_2xx_bodies(
    client: httpx.AsyncClient, provider: str, body: Any, error: type[ProviderError]
) -> None:
    async with stub_server(reply(200, body)) as stub:
        with pytest.raises(ProviderError) as caught:
            await make_provider(target(provider, stub.url), client, None).complete("hi")
    assert type(caught.value) is error


async def test_timeouts_are_transient(client: httpx.AsyncClient) -> None:
    hang = FakeConfig(errors={"hang": 1.0}, hang_s=30)
    async with FakeProvider(hang) as fake:
        p = make_provider(target(endpoint=fake.url, timeoutSeconds=0.3), client, None)
        started = asyncio.get_running_loop().time()
        with pytest.raises(TransientError, match=r"within 0\.3s"):
            await p.complete("hi")
        assert asyncio.get_running_loop().time() - started < 2
        fake.configure(FakeConfig(latency_ms=2000))
        with pytest.raises(TransientError):
            await p.complete("hi")
        assert fake.stats().by_status == {"hang": 1}


async def test_total_deadline_bounds_a_trickling_server(client: httpx.AsyncClient) -> None:
    async def trickle(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        for _ in range(40):
            await response.write(b" ")
            await asyncio.sleep(0.05)
        return response

    async with stub_server(trickle) as stub:
        p = make_provider(target(endpoint=stub.url, timeoutSeconds=0.5), client, None)
        with pytest.raises(TransientError, match="deadline"):
            await p.complete("hi")


async def test_connection_and_protocol_errors_are_transient(client: httpx.AsyncClient) -> None:
    refused = make_provider(target(endpoint=f"http://127.0.0.1:{free_port()}"), client, None)
    with pytest.raises(TransientError, match="ConnectError"):
        await refused.complete("hi")

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)
        writer.write(b"THIS IS NOT HTTP\r\n\r\n")
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(garbage, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        broken = make_provider(target(endpoint=f"http://127.0.0.1:{port}"), client, None)
        with pytest.raises(TransientError, match="Protocol"):
            await broken.complete("hi")


async def test_empty_prompt_is_invalid_input(client: httpx.AsyncClient) -> None:
    for provider in ("openai", "anthropic", "http", "echo"):
        p = make_provider(target(provider, "http://127.0.0.1:9"), client, None)
        with pytest.raises(InvalidInput):
            await p.complete("  \n")


async def test_prompt_too_long_at_the_fake_provider(client: httpx.AsyncClient) -> None:
    async with FakeProvider(FakeConfig(max_prompt_chars=100)) as fake:
        p = make_provider(target(endpoint=fake.url), client, None)
        with pytest.raises(InvalidInput, match="context_length_exceeded"):
            await p.complete("x" * 101)
        assert (await p.complete("x" * 100)).text


# --- secrets --------------------------------------------------------------------------------


def _everything_about(exc: BaseException) -> str:
    """Every place a secret could hide in an exception: message, repr, args, the chain."""
    seen: list[str] = []
    current: BaseException | None = exc
    while current is not None:
        seen += [str(current), repr(current), repr(current.args), repr(vars(current))]
        seen += traceback.format_exception(current)
        current = current.__cause__ or current.__context__
    return "\n".join(seen)


async def _echo_headers(request: web.Request) -> web.StreamResponse:
    """A careless server: its error bodies repeat the credentials it was sent, bare."""
    sent = [request.headers.get(h, "") for h in ("x-api-key", "Authorization", "X-Key")]
    bare = " ".join(v.removeprefix("Bearer ") for v in sent if v)
    status = int(request.path.split("/")[1])
    if status == 200:
        text = f"{bare} <- not JSON"
    elif status == 500:
        text = f"{bare} raw dump {dict(request.headers)}"
    else:
        message = f"{bare} is not valid; you sent {dict(request.headers)}"
        text = json.dumps({"error": {"message": message, "type": "invalid_request_error"}})
    return web.Response(status=status, text=text, content_type="application/json")


@pytest.mark.parametrize("key", ["plainkey0123456789abcdef", "sk-proj-0123456789abcdef"])
async def test_api_key_never_leaks(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture, key: str
) -> None:
    caplog.set_level(logging.DEBUG)
    failures: list[BaseException] = []
    async with stub_server(_echo_headers) as stub:
        for provider in ("openai", "anthropic", "http"):
            for status in (200, 400, 401, 429, 500):
                params = {"responsePath": "text"} if provider == "http" else {}
                t = target(provider, f"{stub.url}/{status}", params=params)
                p = make_provider(t, client, key)
                assert key not in repr(p)
                with pytest.raises(ProviderError) as caught:
                    await p.complete("hi")
                failures.append(caught.value)
        assert len(stub.requests) == 15
        kinds = {type(f) for f in failures}
        assert kinds == {TransientError, PermanentError, AuthError, RateLimited}
        assert all(key in json.dumps(h) for _, h, _ in stub.requests)  # the key was sent
    dead = target(endpoint=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(TransientError) as refused:
        await make_provider(dead, client, key).complete("hi")
    failures.append(refused.value)
    async with FakeProvider(FakeConfig(errors={"hang": 1.0})) as fake:
        slow = target(endpoint=fake.url, timeoutSeconds=0.2)
        with pytest.raises(TransientError) as timed_out:
            await make_provider(slow, client, key).complete("hi")
        failures.append(timed_out.value)
    for failure in failures:
        assert key not in _everything_about(failure)
        assert failure.__cause__ is None and failure.__context__ is None
    assert caplog.records, "httpx/httpcore debug logs were captured"
    for record in caplog.records:
        assert key not in record.getMessage()
        assert key not in repr(vars(record))


# --- keys and construction ------------------------------------------------------------------


def test_resolve_api_key_order(tmp_path: Path) -> None:
    secret = tmp_path / "key"
    secret.write_text("from-file\n")
    t = target(name="my-target")
    env = {
        "ANALYSISQ_API_KEY_MY_TARGET": "from-env",
        "ANALYSISQ_API_KEY_FILE_MY_TARGET": str(secret),
        "CUSTOM": "custom-value",
    }
    custom = t.model_copy(update={"api_key_env": "CUSTOM"})
    assert resolve_api_key(custom, env) == "custom-value"
    assert resolve_api_key(t, env) == "from-env"
    del env["ANALYSISQ_API_KEY_MY_TARGET"]
    assert resolve_api_key(t, env) == "from-file"
    assert resolve_api_key(t, {}) is None


def test_resolve_api_key_errors_name_the_source_not_the_value(tmp_path: Path) -> None:
    t = target(apiKeyEnv="MY_KEY")
    with pytest.raises(ConfigError, match="MY_KEY") as caught:
        resolve_api_key(t, {"OTHER": "x"})
    assert "'t-1'" in str(caught.value)
    plain = target()
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match="nope"):
        resolve_api_key(plain, {"ANALYSISQ_API_KEY_FILE_T_1": str(missing)})
    empty = tmp_path / "empty"
    empty.write_text("  \n")
    with pytest.raises(ConfigError, match="empty"):
        resolve_api_key(plain, {"ANALYSISQ_API_KEY_FILE_T_1": str(empty)})


async def test_make_provider_checks(client: httpx.AsyncClient) -> None:
    for provider, endpoint in [
        ("openai", None),
        ("openai", "https://api.openai.com/v1"),
        ("anthropic", None),
        ("anthropic", "https://api.anthropic.com"),
    ]:
        with pytest.raises(ConfigError, match=r"'t-1'.*needs an API key"):
            make_provider(target(provider, endpoint), client, None)
    local: Provider = make_provider(target("openai", "http://localhost:11434/v1"), client, None)
    assert isinstance(local, OpenAIProvider)
    assert isinstance(make_provider(target("anthropic"), client, "k"), AnthropicProvider)
    assert isinstance(make_provider(target("http", "http://x"), client, None), HttpProvider)
    with pytest.raises(ConfigError, match="streaming"):
        make_provider(target(params={"stream": True}), client, "k")
    with pytest.raises(ConfigError, match="delayMs"):
        make_provider(target("echo", params={"delayMs": "soon"}), client, None)


async def test_http_client_settings() -> None:
    async with make_http_client(max_connections=7, timeout_s=12) as c:
        assert c.headers["User-Agent"] == f"analysisq/{__version__}"
        assert c.timeout.read == 12 and c.timeout.connect == 10
        assert not c.follow_redirects


@pytest.mark.parametrize(
    ("status", "body", "fault", "setting"),
    [
        (404, _oai_error("The model `gpt-mok` does not exist", code="model_not_found"),
         "HTTP 404 model_not_found", "model"),
        (400, _oai_error("Invalid model name passed in model=gpt-mok", code="400"),
         "HTTP 400 invalid_request_error", "model"),
        (400, {"error": "model 'llama9' not found, try pulling it first"}, "HTTP 400", "model"),
        (404, _anthropic_error("not_found_error", "model: claude-sonnet-9"),
         "HTTP 404 not_found_error", "model"),
        (404, {"object": "error", "message": "The model `m` does not exist.",
               "type": "NotFoundError", "code": 404}, "HTTP 404 NotFoundError", "model"),
        (404, _anthropic_error("not_found_error", "Not Found"), "HTTP 404 not_found_error",
         "endpoint"),
        (404, "404 page not found", "HTTP 404", "endpoint"),
        (405, "Method Not Allowed", "HTTP 405", "endpoint"),
    ],
)  # fmt: skip
def test_target_faults_name_the_setting_to_fix(
    status: int, body: Any, fault: str, setting: str
) -> None:
    text = body if isinstance(body, str) else json.dumps(body)
    err = error_for_response(status, {}, text, where="gw.example/v1/chat/completions")
    assert isinstance(err, TargetFault)
    assert (err.fault, err.setting, err.error_class) == (fault, setting, "permanent")


@pytest.mark.parametrize(
    ("status", "body", "message"),
    [
        (400, _oai_error("Invalid model name passed in model=m", code="400"),
         "HTTP 400 from gw.example/v1: invalid_request_error: Invalid model name passed in "
         "model=m"),
        (404, "404: Not Found", "HTTP 404 from gw.example/v1: Not Found"),
        (404, "404 page not found", "HTTP 404 from gw.example/v1: 404 page not found"),
        (404, {"object": "error", "message": "gone", "type": "NotFoundError", "code": 404},
         "HTTP 404 from gw.example/v1: NotFoundError: gone"),
        (502, "502", "HTTP 502 from gw.example/v1: 502"),
        (500, "500 errors today", "HTTP 500 from gw.example/v1: 500 errors today"),
        (502, "502:", "HTTP 502 from gw.example/v1: 502:"),
        (503, "5030 queued", "HTTP 503 from gw.example/v1: 5030 queued"),
    ],
)  # fmt: skip
def test_an_error_message_says_the_status_once(status: int, body: Any, message: str) -> None:
    text = body if isinstance(body, str) else json.dumps(body)
    assert error_for_response(status, {}, text, where="gw.example/v1").message == message


@pytest.mark.parametrize(
    "body",
    [
        _oai_error("Unrecognized request argument: foo"),
        _oai_error("This model's maximum context length is 8192 tokens", param="messages"),
        _oai_error("flagged", code="content_policy_violation"),
    ],
)
def test_prompt_faults_are_not_target_faults(body: Any) -> None:
    err = error_for_response(400, {}, json.dumps(body), where="gw.example/v1")
    assert not isinstance(err, TargetFault)

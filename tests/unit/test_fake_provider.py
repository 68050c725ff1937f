"""The fake provider, driven over real HTTP: its answers, faults, rate cap and counters."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import click
import httpx
import pytest
from click.testing import CliRunner
from pydantic import ValidationError

from analysisq.errors import ConfigError, PermanentError, RateLimited, TransientError
from analysisq.fake_provider import FakeConfig, FakeProvider, serve
from analysisq.fake_provider.app import _TokenBucket
from analysisq.fake_provider.cli_options import config_from_options, fake_provider_options
from analysisq.fake_provider.stats import Recorder, prompt_key
from analysisq.providers import make_http_client, make_provider
from analysisq.spec import Target

pytestmark = pytest.mark.unit


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
        yield client


def chat(prompt: str, **extra: Any) -> dict[str, Any]:
    messages = [{"role": "system", "content": "You analyse."}, {"role": "user", "content": prompt}]
    return {"model": "gpt-test", "messages": messages, **extra}


async def post(
    http: httpx.AsyncClient, fake: FakeProvider, prompt: str, **kw: Any
) -> httpx.Response:
    return await http.post(f"{fake.url}/chat/completions", json=chat(prompt), **kw)


async def test_answers_like_openai(http: httpx.AsyncClient) -> None:
    async with FakeProvider() as fake:
        assert fake.url.startswith("http://127.0.0.1:") and fake.url.endswith("/v1")
        prompt = "Summarise the customer's complaint about late delivery."
        first, second = await post(http, fake, prompt), await post(http, fake, prompt)
        other = await post(http, fake, "Something else entirely.")
        health = await http.get(fake.url.removesuffix("/v1") + "/healthz")
        models = await http.get(f"{fake.url}/models")
    assert first.status_code == 200 and health.json() == {"status": "ok"}
    assert models.json()["data"][0]["id"] == "fake-model"
    body = first.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == "gpt-test"
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["message"]["role"] == "assistant"
    content = choice["message"]["content"]
    assert content == second.json()["choices"][0]["message"]["content"]
    assert content != other.json()["choices"][0]["message"]["content"]
    assert json.loads(content)["prompt_sha256"] == hashlib.sha256(prompt.encode()).hexdigest()
    usage = body["usage"]
    assert usage["prompt_tokens"] == (len("You analyse.") + 3) // 4 + (len(prompt) + 3) // 4
    assert usage["completion_tokens"] == (len(content) + 3) // 4
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_bad_requests(http: httpx.AsyncClient) -> None:
    async with FakeProvider() as fake:
        garbage = await http.post(f"{fake.url}/chat/completions", content=b"{nope")
        no_user = await http.post(
            f"{fake.url}/chat/completions",
            json={"messages": [{"role": "system", "content": "x"}]},
        )
        stats = fake.stats()
    assert garbage.status_code == no_user.status_code == 400
    assert garbage.json()["error"]["type"] == "invalid_request_error"
    assert stats.requests == 2 and stats.by_status == {"400": 2} and stats.prompts == 0


async def test_require_api_key(http: httpx.AsyncClient) -> None:
    async with FakeProvider(FakeConfig(require_api_key="sk-right-0000")) as fake:
        missing = await post(http, fake, "p")
        wrong = await post(http, fake, "p", headers={"Authorization": "Bearer sk-wrong"})
        right = await post(http, fake, "p", headers={"Authorization": "Bearer sk-right-0000"})
        anthropic_style = await post(http, fake, "p", headers={"x-api-key": "sk-right-0000"})
        config = (await http.get(fake.url.removesuffix("/v1") + "/config")).json()
    assert [r.status_code for r in (missing, wrong, right, anthropic_style)] == [401, 401, 200, 200]
    assert missing.json()["error"]["code"] == "invalid_api_key"
    assert "sk-right-0000" not in wrong.text
    assert "require_api_key" not in config


async def test_fail_first_then_complete_within_three_attempts(http: httpx.AsyncClient) -> None:
    prompts = [f"prompt number {i}" for i in range(10)]
    async with FakeProvider(FakeConfig(fail_first=2)) as fake:
        attempts = {}
        for prompt in prompts:
            for attempt in range(1, 10):
                response = await post(http, fake, prompt)
                if response.status_code == 200:
                    attempts[prompt] = attempt
                    break
                assert response.status_code == 503
        stats = fake.stats()
        counts = fake.prompt_counts(prompts[0])
    assert set(attempts.values()) == {3}
    assert stats.by_status == {"200": 10, "503": 20}
    assert (stats.prompts, stats.prompts_completed, stats.completions) == (10, 10, 10)
    assert stats.max_requests_per_prompt == 3 and stats.prompts_completed_more_than_once == 0
    assert (counts.requests, counts.completions) == (3, 1)


async def test_fail_first_through_the_openai_provider() -> None:
    async with (
        make_http_client(trust_env=False) as client,
        FakeProvider(FakeConfig(fail_first=2)) as fake,
    ):
        provider = make_provider(
            Target(name="fake", provider="openai", model="m", endpoint=fake.url), client, None
        )
        for _ in range(2):
            with pytest.raises(TransientError, match="HTTP 503"):
                await provider.complete("retry me")
        assert (await provider.complete("retry me")).parsed is not None


async def test_duplicate_counting_and_reset(http: httpx.AsyncClient) -> None:
    async with FakeProvider() as fake:
        for prompt in ("a", "a", "b", "c", "c", "c"):
            assert (await post(http, fake, prompt)).status_code == 200
        stats = (await http.get(fake.url.removesuffix("/v1") + "/stats")).json()
        reset = await http.post(fake.url.removesuffix("/v1") + "/reset")
        after = fake.stats()
    assert stats["prompts"] == 3
    assert stats["prompts_completed_more_than_once"] == 2
    assert stats["max_completions_per_prompt"] == 3 == stats["max_requests_per_prompt"]
    assert stats["requests"] == stats["completions"] == 6 == stats["max_requests_10s"]
    assert reset.status_code == 200
    assert after.requests == 0 and after.prompts == 0 and after.by_status == {}


async def test_rate_cap_holds_when_flooded(http: httpx.AsyncClient) -> None:
    """Over real HTTP the cap refuses what exceeds it, and refuses only then: every 429 says
    the next token is at most one period (1/rps) away, so a refusal never spends a token and
    the bucket refills at the advertised rate. That holds however slow the machine is (a
    loaded machine sends fewer requests per second, it cannot make the server stingier); the
    admitted rate itself is checked on the bucket's own clock below."""
    rps, duration = 20.0, 2.5
    period_ms = math.ceil(1000 / rps)
    async with FakeProvider(FakeConfig(rate_limit_rps=rps)) as fake:
        began = time.monotonic()
        waits_ms: list[int] = []
        capped: list[httpx.Response] = []
        sent = 0

        def flooding() -> bool:
            # at least `duration` seconds and 3x the cap's requests, however slow the machine
            return time.monotonic() - began < duration or sent <= 3 * rps * duration

        async def flood(worker: int) -> None:
            nonlocal sent
            while flooding():
                response = await post(http, fake, f"w{worker}-{sent}")
                sent += 1
                if response.status_code == 429:
                    waits_ms.append(int(response.headers["retry-after-ms"]))
                    if not capped:
                        capped.append(response)

        await asyncio.gather(*(flood(w) for w in range(8)))
        elapsed = time.monotonic() - began
        stats = fake.stats()
        seen = await http.get(fake.url.removesuffix("/v1") + "/stats", params={"histogram": "1"})
    assert stats.requests > 3 * rps * duration, "the flood was faster than the cap"
    assert stats.by_status["429"] == len(waits_ms) > 0
    assert stats.max_completions_1s <= rps * 1.1
    assert stats.completions <= rps * elapsed * 1.1 + 2
    assert 0 < max(waits_ms) <= period_ms, sorted(waits_ms)[-5:]
    headers = capped[0].headers
    assert 0 < int(headers["retry-after-ms"]) <= 1000 and headers["Retry-After"] == "1"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert sum(n for _, n in seen.json()["requests_per_second"]) == stats.requests


def test_rate_cap_admits_its_rate_when_flooded() -> None:
    """The fake's token bucket on its own clock (``take(now)``): 8 clients asking every 5 ms
    for 2.5 s get the cap's rate, no less (within 5 %) and no more (rate x time + burst),
    and no 1 s window holds more than the cap and its burst."""
    rps, duration, burst = 20.0, 2.5, FakeConfig(rate_limit_rps=20.0).burst
    bucket = _TokenBucket(rps, burst)
    admitted = [
        t
        for t in (tick * 0.005 for tick in range(int(duration / 0.005)))
        for _ in range(8)
        if bucket.take(t) == 0
    ]
    assert rps * duration * 0.95 <= len(admitted) <= rps * duration + burst
    assert max(sum(1 for u in admitted if t <= u < t + 1) for t in admitted) <= rps + burst


async def test_rate_cap_429_maps_to_rate_limited() -> None:
    config = FakeConfig(rate_limit_rps=1, rate_limit_burst=1)
    async with make_http_client(trust_env=False) as client, FakeProvider(config) as fake:
        target = Target(name="fake", provider="openai", model="m", endpoint=fake.url)
        provider = make_provider(target, client, None)
        await provider.complete("first")
        with pytest.raises(RateLimited) as caught:
            await provider.complete("second")
    assert caught.value.delay is not None and 0.5 < caught.value.delay <= 1.0


async def test_error_mix_is_seeded_and_mapped() -> None:
    config = FakeConfig(errors={"500": 0.3, "429": 0.2, "400": 0.1}, retry_after_s=2, seed=7)

    async def outcomes() -> list[str]:
        async with make_http_client(trust_env=False) as client, FakeProvider(config) as fake:
            target = Target(name="fake", provider="openai", model="m", endpoint=fake.url)
            provider = make_provider(target, client, None)
            seen = []
            for i in range(40):
                try:
                    await provider.complete(f"p{i}")
                    seen.append("ok")
                except RateLimited as exc:
                    assert exc.delay == 2
                    seen.append("429")
                except PermanentError as exc:
                    assert exc.status == 400
                    seen.append("400")
                except TransientError as exc:
                    assert exc.status == 500
                    seen.append("500")
            stats = fake.stats()
            assert stats.by_status.get("200", 0) == seen.count("ok")
            return seen

    first, second = await outcomes(), await outcomes()
    assert first == second
    assert {"ok", "500", "429", "400"} <= set(first)


async def test_malformed_body_is_transient() -> None:
    async with (
        make_http_client(trust_env=False) as client,
        FakeProvider(FakeConfig(errors={"malformed": 1.0})) as fake,
    ):
        target = Target(name="fake", provider="openai", model="m", endpoint=fake.url)
        with pytest.raises(TransientError, match="malformed JSON"):
            await make_provider(target, client, None).complete("p")
        assert fake.stats().by_status == {"malformed": 1}


async def test_latency_is_applied(http: httpx.AsyncClient) -> None:
    async with FakeProvider(FakeConfig(latency_ms=80, jitter_ms=10)) as fake:
        started = time.monotonic()
        response = await post(http, fake, "slow")
        elapsed = time.monotonic() - started
    assert response.status_code == 200 and 0.065 <= elapsed < 1
    assert 70 <= int(response.headers["openai-processing-ms"]) <= 90


async def test_lognormal_latency_mean(http: httpx.AsyncClient) -> None:
    config = FakeConfig(latency_ms=20, lognormal_sigma=0.5, seed=1)
    async with FakeProvider(config) as fake:
        responses = await asyncio.gather(*(post(http, fake, f"p{i}") for i in range(200)))
    latencies = [int(r.headers["openai-processing-ms"]) for r in responses]
    assert 16 <= sum(latencies) / len(latencies) <= 24
    assert max(latencies) > 30  # a tail


async def test_config_route(http: httpx.AsyncClient) -> None:
    async with FakeProvider() as fake:
        base = fake.url.removesuffix("/v1")
        changed = await http.post(f"{base}/config", json={"errors": {"503": 1.0}})
        failing = await post(http, fake, "p")
        invalid = await http.post(f"{base}/config", json={"errors": {"500": 0.7, "503": 0.7}})
        not_object = await http.post(f"{base}/config", json=[1])
    assert changed.json()["errors"] == {"503": 1.0}
    assert failing.status_code == 503 and fake.config.errors == {"503": 1.0}
    assert invalid.status_code == 400 and "sum to at most 1" in invalid.json()["error"]
    assert not_object.status_code == 400


def test_config_validation() -> None:
    with pytest.raises(ValidationError):
        FakeConfig(errors={"500": 0.6, "hang": 0.5})
    with pytest.raises(ValidationError):
        FakeConfig.model_validate({"errors": {"418": 0.1}})
    with pytest.raises(ValidationError):
        FakeConfig.model_validate({"latency": 5})
    assert FakeConfig(rate_limit_rps=50).burst == 5
    assert FakeConfig(rate_limit_rps=3).burst == 1
    assert "sk-secret" not in repr(FakeConfig(require_api_key="sk-secret"))


def test_sliding_windows() -> None:
    recorder = Recorder()
    for t in (100.0, 100.5, 100.9, 101.0, 101.5, 110.2, 125.0):
        recorder.request(t)
    stats = recorder.snapshot()
    assert (stats.max_requests_1s, stats.max_requests_10s) == (3, 5)
    assert stats.elapsed_s == 25.0
    assert recorder.histogram() == [(0, 3), (1, 2), (10, 1), (25, 1)]
    assert recorder.counts(prompt_key("never")).requests == 0


def test_cli_options_build_the_config(tmp_path: Path) -> None:
    file = tmp_path / "fake.yaml"
    file.write_text("latency_ms: 30\nerrors: {'500': 0.1}\nseed: 3\n")
    built: list[tuple[str, int, Any]] = []

    @click.command()
    @fake_provider_options
    def command(host: str, port: int, **options: Any) -> None:
        built.append((host, port, config_from_options(options)))

    result = CliRunner().invoke(
        command,
        [
            "--port", "9999", "--config", str(file), "--error", "hang=0.05",
            "--error", "429=0.1", "--fail-first", "2", "--fail-first-status", "500",
            "--rate-limit-rps", "50", "--seed", "4", "--known-model", "gpt-a",
            "--known-model", "gpt-b", "--unknown-model-status", "400",
        ],
        env={"ANALYSISQ_FAKE_PROVIDER_API_KEY": "sk-from-env-000"},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    host, port, config = built[0]
    assert (host, port) == ("127.0.0.1", 9999)
    assert config.latency_ms == 30 and config.seed == 4 and config.fail_first == 2
    assert config.errors == {"500": 0.1, "hang": 0.05, "429": 0.1}
    assert config.fail_first_status == 500 and config.rate_limit_rps == 50
    assert config.require_api_key == "sk-from-env-000"
    assert config.known_models == ["gpt-a", "gpt-b"] and config.unknown_model_status == 400
    with pytest.raises(ConfigError, match="KIND=PROBABILITY"):
        config_from_options({"errors": ("500",)})
    with pytest.raises(ConfigError, match="errors"):
        config_from_options({"errors": ("500=2",)})


async def test_serve_until_cancelled(http: httpx.AsyncClient) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    task = asyncio.create_task(serve(FakeConfig(), "127.0.0.1", port))
    try:
        for _ in range(100):
            try:
                health = await http.get(f"http://127.0.0.1:{port}/healthz")
                break
            except httpx.ConnectError:
                await asyncio.sleep(0.02)
        assert health.json() == {"status": "ok"}
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

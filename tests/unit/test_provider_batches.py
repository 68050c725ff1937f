"""The Batch API clients (OpenAI, Anthropic) against the fake provider over real HTTP."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from analysisq.errors import ConfigError, PermanentError, RateLimited, TransientError
from analysisq.fake_provider import FakeConfig, FakeProvider
from analysisq.providers import make_batch_client, make_http_client
from analysisq.providers.batch import (
    BatchClient,
    BatchEntry,
    BatchResult,
    BatchState,
    custom_id,
)
from analysisq.providers.client import Reply
from analysisq.spec import Target

pytestmark = pytest.mark.unit


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    client = make_http_client(trust_env=False)
    yield client
    await client.aclose()


def target(fake: FakeProvider, provider: str) -> Target:
    endpoint = fake.url if provider == "openai" else fake.root_url
    return Target(name="t", provider=provider, model="m", endpoint=endpoint, mode="batch")


def entries(n: int) -> list[BatchEntry]:
    return [BatchEntry(custom_id(i + 1, uuid.uuid4()), f"Analyse text {i}.") for i in range(n)]


async def submit(
    client: BatchClient, sent: Sequence[BatchEntry], metadata: Mapping[str, str]
) -> str:
    """Write *sent* to a batch input of *client* and submit it."""
    with client.spool() as body:
        for entry in sent:
            body.write(body.encode(entry))
        return await client.submit(body, metadata)


async def ended(client: BatchClient, provider_id: str) -> BatchState:
    for _ in range(500):
        state = await client.poll(provider_id)
        if state.phase != "open":
            return state
        await asyncio.sleep(0.02)
    raise AssertionError("never ended")


async def collect(client: BatchClient, state: BatchState) -> list[BatchResult]:
    return [r async for r in client.results(state)]


def test_custom_id_names_item_and_claim_within_anthropics_pattern() -> None:
    token = uuid.uuid4()
    value = custom_id(9_223_372_036_854_775_807, token)
    assert len(value) <= 64 and value.replace("-", "").replace("_", "").isalnum()
    assert value == f"9223372036854775807-{token.hex}"


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_submit_poll_results_with_an_error_mix(
    http: httpx.AsyncClient, provider: str
) -> None:
    config = FakeConfig(batch_seconds=0.5, batch_errors={"500": 0.1, "400": 0.01})
    async with FakeProvider(config) as fake:
        client = make_batch_client(target(fake, provider), http, None)
        sent = entries(2000)
        metadata = {"analysisq_run": "r", "analysisq_submission": "1"}
        provider_id = await submit(client, sent, metadata)
        state = await ended(client, provider_id)
        results = await collect(client, state)
        since = datetime.now(UTC)
        found = await client.find(metadata, since=since, count=2000, known=set())
        stats = fake.stats()
    assert state.phase == "ended" and len(state.outputs) >= 1
    assert sorted(r.custom_id or "" for r in results) == sorted(e.custom_id for e in sent)
    ok = [r for r in results if r.completion is not None]
    transient = [r for r in results if isinstance(r.error, TransientError)]
    permanent = [r for r in results if isinstance(r.error, PermanentError)]
    assert len(ok) + len(transient) + len(permanent) == 2000
    assert 120 < len(transient) < 290 and 3 < len(permanent) < 50
    assert all(r.completion.model == "m" and r.completion.parsed for r in ok)  # type: ignore[union-attr]
    assert found == provider_id
    assert stats.batches_created == 1 and stats.prompts_completed_more_than_once == 0


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_expired_and_cancelled_requests_are_unspent(
    http: httpx.AsyncClient, provider: str
) -> None:
    async with FakeProvider(FakeConfig(batch_seconds=0.3, batch_expire_first=1)) as fake:
        client = make_batch_client(target(fake, provider), http, None)
        expired = await collect(client, await ended(client, await submit(client, entries(20), {})))
        fake.configure(FakeConfig(batch_seconds=30))
        slow = await submit(client, entries(20), {})
        await client.cancel(slow)
        cancelled = await collect(client, await ended(client, slow))
        await client.cancel(slow)  # ended already: not an error
    assert sum(r.unspent for r in expired) == 10
    assert sum(r.completion is not None for r in expired) == 10
    assert all(r.unspent for r in cancelled) and len(cancelled) == 20


async def test_openai_token_limit_is_back_pressure(http: httpx.AsyncClient) -> None:
    async with FakeProvider(FakeConfig(batch_seconds=0.1, batch_fail_first=1)) as fake:
        client = make_batch_client(target(fake, "openai"), http, None)
        state = await ended(client, await submit(client, entries(3), {}))
    assert state.phase == "failed" and isinstance(state.failure, RateLimited)
    assert "token_limit_exceeded" in state.failure.message


async def test_anthropic_queue_limit_is_rate_limited(http: httpx.AsyncClient) -> None:
    async with FakeProvider(FakeConfig(batch_fail_first=1)) as fake:
        client = make_batch_client(target(fake, "anthropic"), http, None)
        with pytest.raises(RateLimited):
            await submit(client, entries(3), {})
        assert fake.stats().batches_created == 0


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_transient_404_after_create_is_transient_and_find_skips_known(
    http: httpx.AsyncClient, provider: str
) -> None:
    async with FakeProvider(FakeConfig(batch_seconds=5, batch_not_found_s=0.5)) as fake:
        client = make_batch_client(target(fake, provider), http, None)
        since = datetime.now(UTC)
        provider_id = await submit(client, entries(4), {"analysisq_submission": "7"})
        with pytest.raises(PermanentError) as caught:
            await client.poll(provider_id)
        other = await client.find({"analysisq_submission": "8"}, since=since, count=5, known=set())
        await asyncio.sleep(0.6)
        assert (await client.poll(provider_id)).phase == "open"
        found = await client.find({"analysisq_submission": "7"}, since=since, count=4, known=set())
        owned = await client.find(
            {"analysisq_submission": "7"}, since=since, count=4, known={provider_id}
        )
    assert caught.value.status == 404
    assert other is None and found == provider_id
    # Anthropic has no metadata: a batch another submission owns is not a candidate.
    assert owned == (provider_id if provider == "openai" else None)


def test_bad_result_lines_are_problems_not_crashes() -> None:
    from analysisq.providers.anthropic_batch import AnthropicBatchClient
    from analysisq.providers.openai_batch import OpenAIBatchClient

    reply = Reply("", 0.0, "fake/results")
    http = httpx.AsyncClient()
    for provider in ("openai", "anthropic"):
        t = Target(name="t", provider=provider, model="m", endpoint="http://x/v1", mode="batch")
        client: Any = make_batch_client(t, http, "sk-secret-key-123")
        assert isinstance(client, OpenAIBatchClient | AnthropicBatchClient)
        for line in ("{not json", '{"no": "custom_id"}', '{"custom_id": 5}'):
            result = client._result(reply, line)
            assert result.custom_id is None and result.problem
    openai_client: Any = make_batch_client(
        Target(name="t", provider="openai", model="m", mode="batch", endpoint="http://x/v1"),
        http,
        None,
    )
    missing = openai_client._result(reply, '{"custom_id": "1-x", "response": null}')
    assert missing.custom_id == "1-x" and "no response" in missing.problem
    garbled = openai_client._result(
        reply, '{"custom_id": "1-x", "response": {"status_code": 200, "body": {"choices": []}}}'
    )
    assert isinstance(garbled.error, TransientError)


def test_batch_mode_needs_a_batch_api() -> None:
    http = httpx.AsyncClient()
    echo = Target(name="t", provider="echo", model="m")
    with pytest.raises(ConfigError, match="no Batch API"):
        make_batch_client(echo, http, None)


async def test_the_key_goes_only_to_the_endpoints_own_host(http: httpx.AsyncClient) -> None:
    from analysisq.errors import AuthError

    async with FakeProvider(FakeConfig(batch_seconds=0.1, require_api_key="sk-ant-key")) as fake:
        client = make_batch_client(target(fake, "anthropic"), http, "sk-ant-key")
        state = await ended(client, await submit(client, entries(3), {}))
        assert len(await collect(client, state)) == 3
        # The same server under another name: a results_url elsewhere gets no key.
        elsewhere = state.outputs[0].replace("127.0.0.1", "localhost")
        moved = BatchState(state.provider_id, state.phase, state.status, outputs=(elsewhere,))
        with pytest.raises(AuthError) as refused:
            await collect(client, moved)
    assert "sk-ant-key" not in str(refused.value)

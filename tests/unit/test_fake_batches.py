"""The fake provider's Batch APIs, driven by the official ``openai`` and ``anthropic`` SDKs."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import httpx
import openai
import pytest
from click.testing import CliRunner

from analysisq.fake_provider import FakeConfig, FakeProvider
from analysisq.fake_provider.cli_options import config_from_options, fake_provider_options

pytestmark = pytest.mark.unit


def chat_line(custom_id: str, prompt: str, model: str = "gpt-test") -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}]}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def message_request(custom_id: str, prompt: str) -> dict[str, Any]:
    params = {
        "model": "claude-test",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": prompt}],
    }
    return {"custom_id": custom_id, "params": params}


@pytest.fixture
async def fake() -> AsyncIterator[FakeProvider]:
    async with FakeProvider(FakeConfig(batch_seconds=0.5)) as server:
        yield server


_OPEN: list[openai.AsyncOpenAI | anthropic.AsyncAnthropic] = []


@pytest.fixture(autouse=True)
async def _close_clients() -> AsyncIterator[None]:
    yield
    while _OPEN:
        await _OPEN.pop().close()


def oai(fake: FakeProvider, key: str = "sk-test") -> openai.AsyncOpenAI:
    _OPEN.append(openai.AsyncOpenAI(base_url=fake.url, api_key=key, max_retries=0))
    return _OPEN[-1]  # type: ignore[return-value]


def claude(fake: FakeProvider) -> anthropic.AsyncAnthropic:
    _OPEN.append(anthropic.AsyncAnthropic(base_url=fake.root_url, api_key="k", max_retries=0))
    return _OPEN[-1]  # type: ignore[return-value]


async def openai_batch(
    client: openai.AsyncOpenAI, lines: list[dict[str, Any]], **metadata: str
) -> Any:
    upload = await client.files.create(file=("in.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
    return await client.batches.create(
        input_file_id=upload.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata=metadata or None,
    )


async def until_ended(client: openai.AsyncOpenAI, batch_id: str) -> tuple[Any, list[str]]:
    seen: list[str] = []
    for _ in range(200):
        batch = await client.batches.retrieve(batch_id)
        if not seen or seen[-1] != batch.status:
            seen.append(batch.status)
        if batch.status in ("completed", "failed", "expired", "cancelled"):
            return batch, seen
        await asyncio.sleep(0.02)
    raise AssertionError(f"batch {batch_id} never ended: {seen}")


async def content_lines(client: openai.AsyncOpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    reply = await client.files.content(file_id)
    return [json.loads(line) for line in reply.content.splitlines()]


async def test_openai_sdk_runs_a_batch_through_every_status(fake: FakeProvider) -> None:
    client = oai(fake)
    prompts = [f"Analyse review number {i}." for i in range(40)]
    batch = await openai_batch(
        client, [chat_line(f"item-{i}", p) for i, p in enumerate(prompts)], run="r1", sub="7"
    )
    assert batch.status == "validating" and batch.metadata == {"run": "r1", "sub": "7"}
    ended, seen = await until_ended(client, batch.id)
    # Polled every 20 ms, so a loaded machine may miss a short phase, never reorder them.
    order = ["validating", "in_progress", "finalizing", "completed"]
    assert seen == sorted(seen, key=order.index) and seen[-1] == "completed"
    assert len(set(seen) & {"in_progress", "finalizing"}) >= 1 or len(seen) == 1
    assert ended.request_counts is not None and ended.request_counts.completed == 40
    assert ended.error_file_id is None and ended.completed_at is not None
    lines = await content_lines(client, ended.output_file_id)
    by_id = {line["custom_id"]: line for line in lines}
    assert sorted(by_id) == sorted(f"item-{i}" for i in range(40))
    assert [line["custom_id"] for line in lines] != sorted(by_id)  # arbitrary order
    answer = by_id["item-3"]["response"]["body"]["choices"][0]["message"]["content"]
    assert json.loads(answer)["prompt_sha256"] == hashlib.sha256(prompts[3].encode()).hexdigest()
    page = await client.batches.list(limit=10)
    assert [b.id for b in page.data] == [batch.id] and page.data[0].metadata["sub"] == "7"
    stats = fake.stats()
    assert stats.batches_created == 1 and stats.batch_requests == 40
    assert stats.prompts_completed == 40 and stats.prompts_completed_more_than_once == 0


async def test_openai_per_request_errors_go_to_the_error_file() -> None:
    config = FakeConfig(batch_seconds=0.2, batch_errors={"500": 0.2, "400": 0.1})
    async with FakeProvider(config) as fake:
        client = oai(fake)
        batch = await openai_batch(client, [chat_line(f"c{i}", f"p {i}") for i in range(300)])
        ended, _ = await until_ended(client, batch.id)
        ok = await content_lines(client, ended.output_file_id)
        errors = await content_lines(client, ended.error_file_id)
    statuses = sorted({e["response"]["status_code"] for e in errors})
    assert statuses == [400, 500] and len(ok) + len(errors) == 300
    assert ended.request_counts.completed == len(ok) and ended.request_counts.failed == len(errors)
    assert 30 < sum(1 for e in errors if e["response"]["status_code"] == 500) < 90
    assert all(e["response"]["body"]["error"]["message"] for e in errors)


async def test_openai_expired_batch_has_partial_results() -> None:
    async with FakeProvider(FakeConfig(batch_seconds=0.2, batch_expire_first=1)) as fake:
        client = oai(fake)
        first = await openai_batch(client, [chat_line(f"a{i}", f"x {i}") for i in range(10)])
        second = await openai_batch(client, [chat_line(f"b{i}", f"y {i}") for i in range(10)])
        expired, _ = await until_ended(client, first.id)
        completed, _ = await until_ended(client, second.id)
        ok = await content_lines(client, expired.output_file_id)
        lost = await content_lines(client, expired.error_file_id)
    assert expired.status == "expired" and completed.status == "completed"
    assert len(ok) == 5 and len(lost) == 5
    assert {line["error"]["code"] for line in lost} == {"batch_expired"}
    assert {line["response"] for line in lost} == {None}


async def test_openai_token_limit_and_validation_failures() -> None:
    async with FakeProvider(FakeConfig(batch_seconds=0.1, batch_fail_first=1)) as fake:
        client = oai(fake)
        refused = await openai_batch(client, [chat_line("a", "x")])
        duplicate = await openai_batch(client, [chat_line("a", "x"), chat_line("a", "y")])
        models = await openai_batch(client, [chat_line("a", "x"), chat_line("b", "y", "other")])
        upload = await client.files.create(
            file=("bad.jsonl", io.BytesIO(b'{"custom_id": "a"\n')), purpose="batch"
        )
        garbled = await client.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        ended = [
            (await until_ended(client, b.id))[0] for b in (refused, duplicate, models, garbled)
        ]
    codes = [b.errors.data[0].code for b in ended]
    assert [b.status for b in ended] == ["failed"] * 4
    assert codes == [
        "token_limit_exceeded",
        "duplicate_custom_id",
        "mismatched_model",
        "invalid_json_line",
    ]
    assert ended[1].errors.data[0].line == 2
    assert all(b.output_file_id is None and b.error_file_id is None for b in ended)


async def test_openai_transient_404_then_cancel_with_partial_results() -> None:
    config = FakeConfig(batch_seconds=4, batch_not_found_s=0.3)
    async with FakeProvider(config) as fake:
        client = oai(fake)
        batch = await openai_batch(client, [chat_line(f"c{i}", f"p {i}") for i in range(100)])
        with pytest.raises(openai.NotFoundError):
            await client.batches.retrieve(batch.id)
        await asyncio.sleep(1.5)
        cancelling = await client.batches.cancel(batch.id)
        ended, _ = await until_ended(client, batch.id)
        ok = await content_lines(client, ended.output_file_id)
        rest = await content_lines(client, ended.error_file_id)
        with pytest.raises(openai.BadRequestError, match="cancelled"):
            await client.batches.cancel(batch.id)
    assert cancelling.status == "cancelling" and ended.status == "cancelled"
    assert 0 < len(ok) < 100 and len(ok) + len(rest) == 100
    assert {line["error"]["code"] for line in rest} == {"batch_cancelled"}


async def test_openai_refuses_a_bad_key_and_a_wrong_purpose() -> None:
    async with FakeProvider(FakeConfig(require_api_key="right")) as fake:
        client = oai(fake)
        with pytest.raises(openai.AuthenticationError):
            await client.files.create(file=("a.jsonl", io.BytesIO(b"{}")), purpose="batch")
        good = oai(fake, "right")
        with pytest.raises(openai.BadRequestError, match="purpose"):
            await good.files.create(file=("a.jsonl", io.BytesIO(b"{}")), purpose="assistants")


async def test_anthropic_sdk_runs_a_batch_and_reads_results(fake: FakeProvider) -> None:
    client = claude(fake)
    prompts = [f"Analyse ticket {i}." for i in range(30)]
    requests = [message_request(f"item_{i}-c1", p) for i, p in enumerate(prompts)]
    batch = await client.messages.batches.create(requests=requests)  # type: ignore[arg-type]
    assert batch.processing_status == "in_progress" and batch.results_url is None
    with pytest.raises(anthropic.AnthropicError, match="results_url"):
        await client.messages.batches.results(batch.id)
    for _ in range(200):
        current = await client.messages.batches.retrieve(batch.id)
        if current.processing_status == "ended":
            break
        await asyncio.sleep(0.02)
    assert current.request_counts.succeeded == 30 and current.ended_at is not None
    results = [r async for r in await client.messages.batches.results(batch.id)]
    by_id = {r.custom_id: r for r in results}
    assert sorted(by_id) == sorted(r["custom_id"] for r in requests)
    result = by_id["item_4-c1"].result
    assert result.type == "succeeded"
    text = result.message.content[0].text  # type: ignore[union-attr]
    assert json.loads(text)["prompt_sha256"] == hashlib.sha256(prompts[4].encode()).hexdigest()
    page = await client.messages.batches.list(limit=5)
    assert [b.id for b in page.data] == [batch.id]
    assert fake.stats().batches_created == 1


async def test_anthropic_errors_expiry_cancel_and_validation() -> None:
    config = FakeConfig(
        batch_seconds=0.3, batch_errors={"500": 0.3}, batch_expire_first=1, batch_fail_first=1
    )
    async with FakeProvider(config) as fake:
        client = claude(fake)
        requests = [message_request(f"r{i}", f"prompt {i}") for i in range(20)]
        expiring = await client.messages.batches.create(requests=requests)  # type: ignore[arg-type]
        with pytest.raises(anthropic.RateLimitError):
            await client.messages.batches.create(requests=requests)  # type: ignore[arg-type]
        for bad in ([*requests[:2], requests[0]], [message_request("has space", "x")]):
            with pytest.raises(anthropic.BadRequestError, match="custom_id"):
                await client.messages.batches.create(requests=bad)  # type: ignore[arg-type]
        await asyncio.sleep(0.5)
        expired = [r async for r in await client.messages.batches.results(expiring.id)]
        fake.configure(FakeConfig(batch_seconds=5))
        slow = await client.messages.batches.create(requests=requests)  # type: ignore[arg-type]
        canceling = await client.messages.batches.cancel(slow.id)
        await asyncio.sleep(0.6)
        canceled = [r async for r in await client.messages.batches.results(slow.id)]
    kinds = sorted(r.result.type for r in expired)
    assert kinds.count("expired") == 10 and "errored" in kinds
    errored = next(r.result for r in expired if r.result.type == "errored")
    assert errored.error.error.type == "api_error"  # type: ignore[union-attr]
    assert canceling.processing_status == "canceling"
    assert {r.result.type for r in canceled} == {"canceled"}
    assert fake.stats().batches_created == 2


async def test_reset_forgets_batches(fake: FakeProvider) -> None:
    client = oai(fake)
    batch = await openai_batch(client, [chat_line("a", "x")])
    async with httpx.AsyncClient(trust_env=False) as http:
        assert (await http.post(fake.root_url + "/reset")).status_code == 200
    with pytest.raises(openai.NotFoundError):
        await client.batches.retrieve(batch.id)
    assert fake.stats().batches_created == 0


def test_batch_flags_build_the_config() -> None:
    import click

    @click.command()
    @fake_provider_options
    def command(host: str, port: int, **options: Any) -> None:
        click.echo(config_from_options(options).model_dump_json())

    args = ["--batch-seconds", "3", "--batch-error", "500=0.1", "--batch-error", "400=0.01"]
    args += ["--batch-expire-first", "1", "--batch-fail-first", "2", "--batch-not-found-s", "1"]
    args += ["--batch-delay-before-create-s", "2", "--batch-delay-after-create-s", "3"]
    args += ["--batch-corrupt-results", "--batch-result-padding-bytes", "100"]
    args += ["--batch-drop-field", "status", "--batch-drop-field", "request_counts"]
    result = CliRunner().invoke(command, args)
    assert result.exit_code == 0, result.output
    config = FakeConfig.model_validate_json(result.output)
    assert config.batch_seconds == 3 and config.batch_errors == {"500": 0.1, "400": 0.01}
    assert (config.batch_expire_first, config.batch_fail_first) == (1, 2)
    assert config.batch_not_found_s == 1 and config.batch_corrupt_results
    assert (config.batch_delay_before_create_s, config.batch_delay_after_create_s) == (2, 3)
    assert config.batch_result_padding_bytes == 100
    assert config.batch_drop_fields == ["status", "request_counts"]
    bad = CliRunner().invoke(command, ["--batch-error", "500"])
    assert bad.exit_code != 0 and "--batch-error '500'" in str(bad.exception)

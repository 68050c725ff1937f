"""What a batch client sends: within the provider's own ceiling, and streamed, not built."""

from __future__ import annotations

import json
import tracemalloc
import uuid
from pathlib import Path

import httpx
import pytest
from aiohttp import web
from test_provider_batches import http, submit

from analysisq.fake_provider import FakeConfig, FakeProvider, openai_batches
from analysisq.providers import batch, make_batch_client, openai_batch
from analysisq.providers.batch import BatchEntry, custom_id
from analysisq.queue.items import ClaimedItem
from analysisq.spec import parse_spec
from analysisq.worker.batch_plan import Plan

pytestmark = pytest.mark.unit

__all__ = ["http"]  # the fixture, shared with test_provider_batches


def item(i: int, text: str) -> ClaimedItem:
    return ClaimedItem(i, uuid.uuid4(), "r", i, f"p{i}", "t", 1, 0, 3, 0, text)


async def test_an_openai_input_over_the_providers_ceiling_is_split_never_refused(
    http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``batch.maxBytes`` may say 256 MB (Anthropic's limit); an OpenAI file holds 200 MB.
    Scaled down: the provider (the fake) takes 6,000 bytes and the client knows it."""
    assert openai_batch.MAX_FILE_BYTES <= openai_batches.MAX_FILE_BYTES  # 200 MB <= 200 MiB
    monkeypatch.setattr(openai_batch, "MAX_FILE_BYTES", 6_000)
    monkeypatch.setattr(openai_batches, "MAX_FILE_BYTES", 6_000)
    async with FakeProvider(FakeConfig(batch_seconds=0)) as fake:
        spec = parse_spec(
            {"targets": [{"name": "t", "provider": "openai", "model": "m", "mode": "batch",
                          "endpoint": fake.url, "batch": {"maxBytes": 256_000_000}}]}
        )  # fmt: skip
        target = spec.targets[0]
        client = make_batch_client(target, http, None)
        claimed = [item(1, "x" * 7_000), *(item(i, f"prompt {i} " * 5) for i in range(2, 200))]
        texts = {i.id: i.text for i in claimed}
        sent = 0
        while claimed:
            with client.spool() as body:
                plan = Plan(client, target, body)
                for i in claimed:
                    plan.add(i, texts[i.id])
                if plan.sent:
                    await client.submit(body, {})  # accepted: a refusal raises
                    sent += 1
            claimed = plan.spill
            if plan.refused:
                ((refused, error),) = plan.refused
                assert refused.id == 1
                assert "6000 bytes, the provider's ceiling" in str(error)
        assert sent > 3 and fake.stats().batches_created == sent


async def test_the_anthropic_body_is_streamed_not_built(
    http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Python memory while sending 40,000 requests stays a small part of the body: it is
    written request by request to a spool (on disk past SPOOL_BYTES) and streamed."""
    monkeypatch.setattr(batch, "SPOOL_BYTES", 2**20)
    received = tmp_path / "body.json"

    async def sink(request: web.Request) -> web.Response:
        with received.open("wb") as out:
            async for chunk in request.content.iter_chunked(2**16):
                out.write(chunk)
        return web.json_response({"id": "msgbatch_1", "type": "message_batch"})

    app = web.Application(client_max_size=2**30)
    app.router.add_post("/v1/messages/batches", sink)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        spec = parse_spec(
            {"targets": [{"name": "t", "provider": "anthropic", "model": "m", "mode": "batch",
                          "endpoint": f"http://127.0.0.1:{port}"}]}
        )  # fmt: skip
        client = make_batch_client(spec.targets[0], http, None)
        entries = [
            BatchEntry(custom_id(i, uuid.uuid4()), f"Analyse text {i}: " + "words " * 40)
            for i in range(40_000)
        ]
        tracemalloc.start()
        try:
            assert await submit(client, entries, {}) == "msgbatch_1"
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    finally:
        await runner.cleanup()
    size = received.stat().st_size
    body = json.loads(received.read_bytes())
    assert [r["custom_id"] for r in body["requests"]] == [e.custom_id for e in entries]
    assert size > 10 * 2**20
    # Building it whole (the old way) peaked above the body's size.
    assert peak < size / 4, (peak, size)
    with client.spool() as sizing:
        assert size == sum(len(sizing.encode(e)) for e in entries) + len(b'{"requests":[]}') - 1

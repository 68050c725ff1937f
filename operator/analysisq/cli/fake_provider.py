"""``analysisq fake-provider``: the OpenAI-compatible fake provider as a server, until
SIGTERM or Ctrl-C. Its flags map one to one onto ``FakeConfig`` (see
``analysisq.fake_provider.cli_options``)."""

from __future__ import annotations

import asyncio
from typing import Any

import click

from analysisq.fake_provider.cli_options import config_from_options, fake_provider_options


@click.command("fake-provider")
@fake_provider_options
def fake_provider(host: str, port: int, **options: Any) -> None:
    """Serve a fake OpenAI-compatible API (latency, faults, 429s, a rate cap) and both
    Batch APIs (OpenAI /v1/files + /v1/batches, Anthropic /v1/messages/batches) for tests,
    the demo and benchmarks. Point a target at http://HOST:PORT/v1 (Anthropic:
    http://HOST:PORT); GET /stats counts requests per prompt and batches created."""
    from analysisq.fake_provider.server import serve  # aiohttp: only this command needs it

    config = config_from_options(options)
    click.echo(f"fake provider on http://{host}:{port}/v1 (stats: http://{host}:{port}/stats)")
    asyncio.run(serve(config, host, port))


COMMANDS = [fake_provider]

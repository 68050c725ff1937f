"""A fake OpenAI-compatible provider for tests, the demo and benchmarks.

It answers ``POST /v1/chat/completions`` like OpenAI would, with configurable latency,
injected faults (400, 401, 429 with Retry-After, 500, 503, malformed JSON, hangs), a
per-prompt ``fail_first`` mode, its own rate cap and an optional required API key, and it
counts requests per prompt so that a test can prove nothing was answered twice. It also
serves OpenAI's Batch API (``/v1/files``, ``/v1/batches``) and Anthropic's Message Batches
API (``/v1/messages/batches``) with a configurable timeline, per-request error mix, expiry,
token-limit refusals and a transient 404 after create, and counts the batches created.

Modules: ``config`` (``FakeConfig``), ``app`` (the routes), ``stats`` (the counters),
``server`` (``FakeProvider`` in-process, ``serve`` for ``analysisq fake-provider``),
``cli_options`` (the command's flags), ``answers`` (the answer to a prompt, in each API's
shape), ``batches`` (the batch timeline), ``openai_batches`` and ``anthropic_batches`` (the
Batch API routes), ``routing`` (keys and error bodies).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from analysisq.fake_provider.config import ERROR_KINDS, ErrorKind, FakeConfig
    from analysisq.fake_provider.server import FakeProvider, serve
    from analysisq.fake_provider.stats import FakeStats, PromptCounts

# Loaded on first use: every `analysisq` process imports the CLI, and only the fake-provider
# command, the demo and tests need the aiohttp server.
_WHERE = {
    "ERROR_KINDS": "config",
    "ErrorKind": "config",
    "FakeConfig": "config",
    "FakeProvider": "server",
    "serve": "server",
    "FakeStats": "stats",
    "PromptCounts": "stats",
}

__all__ = [
    "ERROR_KINDS",
    "ErrorKind",
    "FakeConfig",
    "FakeProvider",
    "FakeStats",
    "PromptCounts",
    "serve",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)

"""A fake OpenAI-compatible provider for tests, the demo and benchmarks.

It answers ``POST /v1/chat/completions`` like OpenAI would, with configurable latency,
injected faults (400, 401, 429 with Retry-After, 500, 503, malformed JSON, hangs), a
per-prompt ``fail_first`` mode, its own rate cap and an optional required API key, and it
counts requests per prompt so that a test can prove nothing was answered twice.

Modules: ``config`` (``FakeConfig``), ``app`` (the routes), ``stats`` (the counters),
``server`` (``FakeProvider`` in-process, ``serve`` for ``analysisq fake-provider``),
``cli_options`` (the command's flags).
"""

from analysisq.fake_provider.config import ERROR_KINDS, ErrorKind, FakeConfig
from analysisq.fake_provider.server import FakeProvider, serve
from analysisq.fake_provider.stats import FakeStats, PromptCounts

__all__ = [
    "ERROR_KINDS",
    "ErrorKind",
    "FakeConfig",
    "FakeProvider",
    "FakeStats",
    "PromptCounts",
    "serve",
]

"""The offline provider: a deterministic answer derived from the prompt, no network.

The answer is the JSON ``{"echo": "analysisq", "model", "chars", "sha256"}`` of the prompt,
so a result can be checked against its prompt. ``params.delayMs`` sleeps that long first.
This is the no-op job of the queue-overhead benchmark: it must stay cheap.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time

from analysisq.completion import Completion
from analysisq.errors import ConfigError
from analysisq.providers.base import check_prompt
from analysisq.spec import Target
from analysisq.tokens import approx_tokens


class EchoProvider:
    """Answers every prompt of one target locally."""

    def __init__(self, target: Target) -> None:
        self.target = target
        try:
            self._delay_s = float(target.params.get("delayMs", 0)) / 1000
        except (TypeError, ValueError):
            raise ConfigError(f"target {target.name!r}: params.delayMs must be a number") from None

    def __repr__(self) -> str:
        return f"EchoProvider(target={self.target.name!r})"

    async def complete(self, prompt: str) -> Completion:
        check_prompt(prompt)
        started = time.perf_counter()
        if self._delay_s > 0:
            await asyncio.sleep(self._delay_s)
        parsed = {
            "echo": "analysisq",
            "model": self.target.model,
            "chars": len(prompt),
            "sha256": hashlib.sha256(prompt.encode()).hexdigest(),
        }
        text = json.dumps(parsed, separators=(",", ":"))
        return Completion(
            text=text,
            parsed=parsed,
            tokens_in=approx_tokens(prompt),
            tokens_out=approx_tokens(text),
            model=self.target.model,
            latency_ms=(time.perf_counter() - started) * 1000,
        )

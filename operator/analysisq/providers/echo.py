"""The offline provider: a deterministic answer derived from the prompt, no network.

The answer is the JSON ``{"echo": "analysisq", "model", "chars", "sha256"}`` of the prompt
(compact, in that order), so a result can be checked against its prompt. ``params.delayMs``
sleeps that long first. This is the no-op job of the queue-overhead benchmark: it must stay
cheap, so the text is put together from the model's JSON (encoded once) and the two values,
and it is also the ``parsed_json`` the results table stores: no JSON encoding per item.
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
        # what json.dumps(..., separators=(",", ":")) writes before the per-prompt values
        self._head = f'{{"echo":"analysisq","model":{json.dumps(target.model)},"chars":'

    def __repr__(self) -> str:
        return f"EchoProvider(target={self.target.name!r})"

    async def complete(self, prompt: str) -> Completion:
        check_prompt(prompt)
        started = time.perf_counter()
        if self._delay_s > 0:
            await asyncio.sleep(self._delay_s)
        chars = len(prompt)
        digest = hashlib.sha256(prompt.encode()).hexdigest()
        text = f'{self._head}{chars},"sha256":"{digest}"}}'
        parsed = {"echo": "analysisq", "model": self.target.model, "chars": chars, "sha256": digest}
        return Completion(
            text=text,
            parsed=parsed,
            parsed_json=text,
            tokens_in=approx_tokens(prompt),
            tokens_out=approx_tokens(text),
            model=self.target.model,
            latency_ms=(time.perf_counter() - started) * 1000,
        )

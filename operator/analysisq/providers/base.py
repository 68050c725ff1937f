"""What every provider returns and promises: ``Completion`` and the ``Provider`` protocol.

A provider turns one prompt into one ``Completion`` or raises one of the ``ProviderError``
classes of ``analysisq.errors``; the worker decides retry or give-up from the type alone.
The HTTP pipeline that providers share lives in ``client``; one module per API follows
(``openai``, ``anthropic``, ``http``, ``echo``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Protocol

from analysisq.errors import InvalidInput
from analysisq.spec import Target


@dataclass(frozen=True)
class Completion:
    """One answer from a provider, as the results table stores it."""

    #: The response text.
    text: str
    #: The text decoded as JSON when it is a JSON object or array (a surrounding Markdown
    #: code fence is tolerated), else ``None``.
    parsed: Any | None
    #: Prompt tokens as the provider counted them, if it said.
    tokens_in: int | None
    #: Completion tokens as the provider counted them, if it said.
    tokens_out: int | None
    #: The model the provider says answered (falls back to the target's model).
    model: str
    #: Wall time of the HTTP exchange (request sent to body read), in milliseconds.
    latency_ms: float
    #: The provider's headers said its rate limit is exhausted for this long: the target's
    #: rate pool waits it out (``analysisq.queue.quota.settle``).
    limit_reset_s: float | None = None


class Provider(Protocol):
    """Sends prompts for one target. Implementations never log or raise their API key."""

    target: Target

    async def complete(self, prompt: str) -> Completion:
        """Answer *prompt*, or raise a ``ProviderError`` subclass saying whether to retry."""
        ...


def check_prompt(prompt: str) -> None:
    """Refuse a prompt that no provider can answer, before spending a request on it."""
    if not prompt.strip():
        raise InvalidInput("the prompt is empty")


def parse_json_text(text: str) -> Any | None:
    """``text`` decoded when it holds a JSON object or array, else ``None``."""
    body = text.strip()
    if body.startswith("```"):
        # Models often wrap JSON in ```json ... ``` even when told not to.
        body = body.removeprefix("```json").removeprefix("```").removesuffix("```").strip()
    if not body or body[0] not in "{[":
        return None
    try:
        return json.loads(body)
    except ValueError:
        return None

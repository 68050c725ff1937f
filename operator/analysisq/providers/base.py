"""What every provider promises: the ``Provider`` protocol, returning a ``Completion``.

``Completion`` itself lives in ``analysisq.completion``, below this layer, because the queue
stores it and must not import providers.

A provider turns one prompt into one ``Completion`` or raises one of the ``ProviderError``
classes of ``analysisq.errors``; the worker decides retry or give-up from the type alone.
The HTTP pipeline that providers share lives in ``client``; one module per API follows
(``openai``, ``anthropic``, ``http``, ``echo``).
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from analysisq.completion import Completion
from analysisq.errors import InvalidInput
from analysisq.spec import Target


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


def parse_json_answer(text: str) -> tuple[Any | None, str | None]:
    """``text`` decoded when it holds a JSON object or array, and the JSON text it was
    decoded from (``Completion.parsed``, ``Completion.parsed_json``); else ``(None, None)``."""
    body = text.strip()
    if body.startswith("```"):
        # Models often wrap JSON in ```json ... ``` even when told not to.
        body = body.removeprefix("```json").removeprefix("```").removesuffix("```").strip()
    if not body or body[0] not in "{[":
        return None, None
    try:
        return json.loads(body), body
    except ValueError:
        return None, None

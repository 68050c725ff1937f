"""``Completion``: one provider answer, as the results table stores it.

It sits at the bottom of the layers because both sides use it: ``analysisq.providers``
returns it and ``analysisq.queue`` stores it (``items.complete``) and settles its usage
(``quota.settle``); the queue never imports providers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
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
    #: The JSON text ``parsed`` was decoded from, when the provider has it: the results
    #: table stores it as it is (after the same repair, ``db.text.db_json``) instead of
    #: encoding ``parsed`` again. None: ``parsed`` is encoded.
    parsed_json: str | None = None

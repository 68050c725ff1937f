"""OpenAI chat completions, and every server that speaks them (vLLM, Ollama, LiteLLM, ...).

``POST {endpoint}/chat/completions`` with ``{"model", "messages": [user prompt], **params}``
(``params`` are OpenAI's own names: ``temperature``, ``max_tokens``, ``response_format``,
``seed``...). The endpoint defaults to ``https://api.openai.com/v1``; an endpoint that already
ends in ``/chat/completions`` is used as given. The answer is ``choices[0].message.content``;
``finish_reason: content_filter`` or a ``refusal`` is ``InvalidInput``.
"""

from __future__ import annotations

from typing import Any

import httpx

from analysisq.completion import Completion
from analysisq.errors import ConfigError, InvalidInput, TransientError
from analysisq.providers.base import check_prompt, parse_json_answer
from analysisq.providers.client import Reply, decode_json, dig, optional_int, post_json, with_path
from analysisq.spec import Target

DEFAULT_ENDPOINT = "https://api.openai.com/v1"


class OpenAIProvider:
    """Chat completions for one target over the shared client."""

    def __init__(self, target: Target, client: httpx.AsyncClient, api_key: str | None) -> None:
        if target.params.get("stream"):
            raise ConfigError(f"target {target.name!r}: streaming responses are not supported")
        self.target = target
        self._client = client
        self._api_key = api_key
        self._url = with_path(target.endpoint or DEFAULT_ENDPOINT, "/chat/completions")

    @property
    def url(self) -> str:
        """``{endpoint}/chat/completions``; the Batch API lives beside it (``/files``,
        ``/batches``)."""
        return self._url

    def __repr__(self) -> str:
        return f"OpenAIProvider(target={self.target.name!r}, url={self._url!r})"

    async def complete(self, prompt: str) -> Completion:
        reply = await post_json(
            self._client,
            self._url,
            self.payload(prompt),
            headers=self.headers(),
            timeout_s=self.target.timeout_seconds,
            secrets=(self._api_key or "",),
        )
        return self.parse(reply, decode_json(reply))

    def payload(self, prompt: str) -> dict[str, Any]:
        """The request body for *prompt*: sent as is, or as one line of a batch file."""
        check_prompt(prompt)
        return {
            **self.target.params,
            "model": self.target.model,
            "messages": [{"role": "user", "content": prompt}],
        }

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}

    def parse(self, reply: Reply, decoded: Any) -> Completion:
        """The ``Completion`` in a decoded ``chat.completion`` (a reply's, or a batch
        result's ``response.body``; *reply* names where it came from)."""
        body = dig(reply, decoded, expect=dict)
        choice = dig(reply, body, "choices", 0, expect=dict)
        message = dig(reply, choice, "message", expect=dict)
        if choice.get("finish_reason") == "content_filter" or message.get("refusal"):
            reason = message.get("refusal") or "finish_reason content_filter"
            raise InvalidInput(f"{reply.where} refused the prompt: {str(reason)[:200]}")
        text = _text(message.get("content"))
        if text is None:
            raise TransientError(f"reply from {reply.where} has no text content")
        usage = body.get("usage")
        usage = usage if isinstance(usage, dict) else {}
        parsed, parsed_json = parse_json_answer(text)
        return Completion(
            text=text,
            parsed=parsed,
            parsed_json=parsed_json,
            tokens_in=optional_int(usage.get("prompt_tokens")),
            tokens_out=optional_int(usage.get("completion_tokens")),
            model=str(body.get("model") or self.target.model),
            latency_ms=reply.latency_ms,
            limit_reset_s=reply.limit_reset_s,
        )


def _text(content: Any) -> str | None:
    """``message.content``: a string, or (some compatible servers) a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict)]
        texts = [p for p in parts if isinstance(p, str)]
        return "".join(texts) if texts else None
    return None

"""Anthropic's Messages API.

``POST {endpoint}/v1/messages`` (endpoint default ``https://api.anthropic.com``) with headers
``x-api-key`` and ``anthropic-version`` and body ``{"model", "max_tokens", "messages": [user
prompt], **params}``; ``max_tokens`` defaults to 1024 (the API requires it), ``system``,
``temperature`` and the rest pass through. ``params.anthropic_version`` overrides the API
version header and is not sent in the body. The answer is the concatenated ``text`` blocks
of ``content``; ``stop_reason: refusal`` is ``InvalidInput``.
"""

from __future__ import annotations

from typing import Any

import httpx

from analysisq.completion import Completion
from analysisq.errors import ConfigError, InvalidInput, TransientError
from analysisq.providers.base import check_prompt, parse_json_answer
from analysisq.providers.client import Reply, decode_json, dig, optional_int, post_json, with_path
from analysisq.spec import Target
from analysisq.tokens import ANTHROPIC_MAX_TOKENS

DEFAULT_ENDPOINT = "https://api.anthropic.com"
API_VERSION = "2023-06-01"


class AnthropicProvider:
    """Messages API calls for one target over the shared client."""

    def __init__(self, target: Target, client: httpx.AsyncClient, api_key: str | None) -> None:
        params = dict(target.params)
        if params.get("stream"):
            raise ConfigError(f"target {target.name!r}: streaming responses are not supported")
        self.target = target
        self._client = client
        self._api_key = api_key
        self._version = str(params.pop("anthropic_version", API_VERSION))
        params.setdefault("max_tokens", ANTHROPIC_MAX_TOKENS)
        self._params = params
        endpoint = target.endpoint or DEFAULT_ENDPOINT
        if httpx.URL(endpoint).path.rstrip("/").endswith("/v1"):
            endpoint = with_path(endpoint, "/messages")
        self._url = with_path(endpoint, "/v1/messages")

    def __repr__(self) -> str:
        return f"AnthropicProvider(target={self.target.name!r}, url={self._url!r})"

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
        """The request body for *prompt*: sent as is, or as a batch request's ``params``."""
        check_prompt(prompt)
        return {
            **self._params,
            "model": self.target.model,
            "messages": [{"role": "user", "content": prompt}],
        }

    def headers(self) -> dict[str, str]:
        headers = {"anthropic-version": self._version}
        if self._api_key:
            headers["x-api-key"] = self._api_key
        return headers

    @property
    def url(self) -> str:
        """``{endpoint}/v1/messages``; the Batch API lives under it (``/batches``)."""
        return self._url

    def parse(self, reply: Reply, decoded: Any) -> Completion:
        """The ``Completion`` in a decoded ``message`` (a reply's, or a batch result's
        ``result.message``; *reply* names where it came from)."""
        body = dig(reply, decoded, expect=dict)
        blocks = dig(reply, body, "content", expect=list)
        if body.get("stop_reason") == "refusal":
            raise InvalidInput(f"{reply.where} refused the prompt (stop_reason refusal)")
        texts = [
            b["text"]
            for b in blocks
            if isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str)
        ]
        if not texts:
            raise TransientError(f"reply from {reply.where} has no text content block")
        text = "".join(texts)
        usage = body.get("usage")
        usage = usage if isinstance(usage, dict) else {}
        parsed, parsed_json = parse_json_answer(text)
        return Completion(
            text=text,
            parsed=parsed,
            parsed_json=parsed_json,
            tokens_in=optional_int(usage.get("input_tokens")),
            tokens_out=optional_int(usage.get("output_tokens")),
            model=str(body.get("model") or self.target.model),
            latency_ms=reply.latency_ms,
            limit_reset_s=reply.limit_reset_s,
        )

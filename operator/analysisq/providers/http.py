"""A generic JSON API: ``POST {endpoint}`` with ``{"prompt", "model", **params}``.

Two params configure the provider itself and are not sent:

- ``responsePath``: where the answer is in the JSON reply, dotted, with list indexes as
  numbers (``output.text``, ``choices.0.text``). A string there is the text; anything else
  is the text as JSON. Without it the whole body is the text.
- ``apiKeyHeader``: the header that carries the key, raw (e.g. ``x-api-key``); by default it
  is ``Authorization: Bearer <key>``.

Token counts are not known for a generic API and stay ``None``.
"""

from __future__ import annotations

import json
from typing import Any

import httpx

from analysisq.completion import Completion
from analysisq.errors import ConfigError
from analysisq.providers.base import check_prompt, parse_json_answer
from analysisq.providers.client import decode_json, dig, post_json
from analysisq.spec import Target

_OWN_PARAMS = ("responsePath", "apiKeyHeader")


class HttpProvider:
    """JSON POSTs to one target's endpoint over the shared client."""

    def __init__(self, target: Target, client: httpx.AsyncClient, api_key: str | None) -> None:
        if not target.endpoint:
            raise ConfigError(f"target {target.name!r}: provider 'http' needs an endpoint")
        self.target = target
        self._client = client
        self._api_key = api_key
        self._url = target.endpoint
        self._params = {k: v for k, v in target.params.items() if k not in _OWN_PARAMS}
        path = target.params.get("responsePath")
        self._path: tuple[str | int, ...] = (
            tuple(int(p) if p.isdigit() else p for p in str(path).split(".") if p) if path else ()
        )
        self._key_header = str(target.params.get("apiKeyHeader") or "Authorization")

    def __repr__(self) -> str:
        return f"HttpProvider(target={self.target.name!r}, url={self._url!r})"

    async def complete(self, prompt: str) -> Completion:
        check_prompt(prompt)
        payload = {**self._params, "prompt": prompt, "model": self.target.model}
        headers: dict[str, str] = {}
        if self._api_key:
            bearer = self._key_header.lower() == "authorization"
            headers[self._key_header] = f"Bearer {self._api_key}" if bearer else self._api_key
        reply = await post_json(
            self._client,
            self._url,
            payload,
            headers=headers,
            timeout_s=self.target.timeout_seconds,
            secrets=(self._api_key or "",),
        )
        text = reply.text
        if self._path:
            answer: Any = dig(reply, decode_json(reply), *self._path)
            text = answer if isinstance(answer, str) else json.dumps(answer)
        parsed, parsed_json = parse_json_answer(text)
        return Completion(
            text=text,
            parsed=parsed,
            parsed_json=parsed_json,
            tokens_in=None,
            tokens_out=None,
            model=self.target.model,
            latency_ms=reply.latency_ms,
            limit_reset_s=reply.limit_reset_s,
        )

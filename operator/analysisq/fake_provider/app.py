"""The fake provider's routes: an OpenAI chat completions endpoint plus control routes.

``POST /v1/chat/completions`` handles a request in the order a real provider would:
record it, check the API key (401), refuse a model it does not serve (404
``model_not_found`` or 400 "Invalid model name", when ``known_models`` is set), apply the rate
cap (429 with ``Retry-After``,
``retry-after-ms`` and ``x-ratelimit-*``), refuse over-long prompts (400
``context_length_exceeded``), wait the drawn latency, then fail the prompt's first
``fail_first`` requests (503), inject a fault from the error mix, or answer. The answer is a
realistic ``chat.completion`` whose content is JSON derived from the prompt alone.

Control: ``GET /stats`` (``?histogram=1`` adds requests per second), ``POST /reset``,
``GET``/``POST /config`` (a partial ``FakeConfig`` as JSON), ``GET /healthz``,
``GET /v1/models``. The Batch APIs (OpenAI ``/v1/files`` + ``/v1/batches``, Anthropic
``/v1/messages/batches``) are ``openai_batches`` and ``anthropic_batches`` over one
``batches.BatchBook``. ``server`` runs this app.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from analysisq.fake_provider.answers import chat_completion, last_user_message
from analysisq.fake_provider.anthropic_batches import AnthropicBatches
from analysisq.fake_provider.batches import BatchBook
from analysisq.fake_provider.config import ERROR_KINDS, ErrorKind, FakeConfig
from analysisq.fake_provider.openai_batches import OpenAIBatches
from analysisq.fake_provider.routing import presented_key
from analysisq.fake_provider.stats import Recorder, prompt_key
from analysisq.tokens import DEFAULT_COMPLETION_TOKENS, approx_tokens

#: Largest request body accepted: Anthropic's 256 MB batch limit and a little more, so that
#: the Batch APIs, not the server, refuse an oversized batch.
BODY_LIMIT = 257 * 1024 * 1024


class _TokenBucket:
    """*rate* tokens a second, at most *burst* saved up; one token per admitted request."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._stamp: float | None = None

    def take(self, now: float) -> float:
        """0 if a token was taken, else the seconds until one will be there."""
        if self._stamp is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens >= 1:
            self._tokens -= 1
            return 0.0
        return (1 - self._tokens) / self.rate

    def headers(self) -> dict[str, str]:
        """OpenAI's ``x-ratelimit-*`` headers of an admitted request: what is left now."""
        remaining = int(self._tokens)
        reset_ms = 0 if remaining else max(1, math.ceil((1 - self._tokens) / self.rate * 1000))
        return {
            "x-ratelimit-limit-requests": f"{self.rate:g}",
            "x-ratelimit-remaining-requests": str(remaining),
            "x-ratelimit-reset-requests": f"{reset_ms}ms",
        }


class FakeApp:
    """State and handlers of one fake provider; ``application()`` wires the routes."""

    def __init__(self, config: FakeConfig) -> None:
        self.recorder = Recorder()
        self.book = BatchBook(config, self.recorder)
        #: Set on shutdown: releases every request held by an injected hang.
        self.closing = asyncio.Event()
        self.configure(config)

    def configure(self, config: FakeConfig) -> None:
        """Use *config* from the next request on (rate cap and random draws restart)."""
        self.config = config
        self._rng = random.Random(config.seed)
        rps = config.rate_limit_rps
        self._bucket = _TokenBucket(rps, config.burst) if rps else None
        self.book.configure(config)

    def reset(self) -> None:
        """Forget every counter (``fail_first`` starts over too)."""
        self.recorder = Recorder()
        self.book.clear(self.recorder)
        self.configure(self.config)

    def application(self) -> web.Application:
        # Batch input files may be 200 MB (OpenAI) and request bodies 256 MB (Anthropic).
        app = web.Application(client_max_size=BODY_LIMIT)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/stats", self.stats)
        app.router.add_post("/reset", self.reset_route)
        app.router.add_get("/config", self.get_config)
        app.router.add_post("/config", self.set_config)
        app.router.add_get("/healthz", self.healthz)
        OpenAIBatches(self.book).add_routes(app)
        AnthropicBatches(self.book).add_routes(app)
        return app

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        self.recorder.request(time.monotonic())
        cfg = self.config
        try:
            body = await request.json()
        except ValueError:
            return self._error(400, "We could not parse the JSON body of your request.")
        prompt = last_user_message(body)
        if prompt is None:
            return self._error(400, "'messages' must end with a user message with text content.")
        key = prompt_key(prompt)
        self.recorder.prompt(key)
        if cfg.require_api_key is not None and presented_key(request) != cfg.require_api_key:
            return self._error(401, "Incorrect API key provided.", code="invalid_api_key")
        model = str(body.get("model") or cfg.model)
        if cfg.known_models is not None and model not in cfg.known_models:
            return self._unknown_model(model, cfg.unknown_model_status)
        if self._bucket is not None:
            wait = self._bucket.take(time.monotonic())
            if wait > 0:
                return self._rate_capped(wait, self._bucket.rate)
        admitted = self.recorder.admitted(key)
        if cfg.max_prompt_chars is not None and len(prompt) > cfg.max_prompt_chars:
            message = (
                f"This model's maximum context length is {max(1, cfg.max_prompt_chars // 4)}"
                f" tokens. However, your messages resulted in {approx_tokens(prompt)} tokens."
                " Please reduce the length of the messages."
            )
            return self._error(400, message, code="context_length_exceeded", param="messages")
        fault = self._draw_fault(cfg)
        latency_s = self._draw_latency(cfg)
        if latency_s > 0:
            await asyncio.sleep(latency_s)
        if admitted <= cfg.fail_first:
            message = "The server had an error while processing your request (fail_first)."
            return self._error(cfg.fail_first_status, message, type_="server_error")
        if fault is not None:
            return await self._fault(fault, cfg)
        return self._completion(body, prompt, key, latency_s)

    async def models(self, request: web.Request) -> web.Response:
        model = {"id": self.config.model, "object": "model", "created": 0, "owned_by": "fake"}
        return web.json_response({"object": "list", "data": [model]})

    async def stats(self, request: web.Request) -> web.Response:
        out = self.recorder.snapshot().to_json()
        if request.query.get("histogram") in ("1", "true"):
            out["requests_per_second"] = self.recorder.histogram()
        return web.json_response(out)

    async def reset_route(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"status": "reset"})

    async def get_config(self, request: web.Request) -> web.Response:
        return web.json_response(self.config.model_dump(mode="json", exclude={"require_api_key"}))

    async def set_config(self, request: web.Request) -> web.Response:
        try:
            patch = await request.json()
            config = FakeConfig.model_validate({**self.config.model_dump(), **patch})
        except (ValueError, TypeError) as exc:
            # ValidationError is a ValueError; its text names the fields, never the key.
            detail = str(exc) if isinstance(exc, ValidationError) else "body must be a JSON object"
            return web.json_response({"error": detail}, status=400)
        self.configure(config)
        return await self.get_config(request)

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    def _draw_fault(self, cfg: FakeConfig) -> ErrorKind | None:
        if not cfg.errors:
            return None
        draw = self._rng.random()
        for kind in ERROR_KINDS:
            draw -= cfg.errors.get(kind, 0.0)
            if draw < 0:
                return kind
        return None

    def _draw_latency(self, cfg: FakeConfig) -> float:
        mean = cfg.latency_ms
        if cfg.lognormal_sigma is not None and mean > 0:
            sigma = cfg.lognormal_sigma
            return self._rng.lognormvariate(math.log(mean) - sigma**2 / 2, sigma) / 1000
        if mean <= 0 and cfg.jitter_ms <= 0:
            return 0.0
        return max(0.0, self._rng.uniform(mean - cfg.jitter_ms, mean + cfg.jitter_ms)) / 1000

    async def _fault(self, kind: ErrorKind, cfg: FakeConfig) -> web.StreamResponse:
        if kind == "hang":
            self.recorder.responded("hang")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.closing.wait(), cfg.hang_s)
            return web.json_response({"error": {"message": "hung"}}, status=504)
        if kind == "malformed":
            self.recorder.responded("malformed")
            broken = '{"id": "chatcmpl-broken", "object": "chat.completion", "choices": [{"ind'
            return web.Response(text=broken, content_type="application/json")
        if kind == "429":
            message = "Rate limit reached for requests (injected fault). Please try again later."
            headers = {"Retry-After": f"{cfg.retry_after_s:g}"}
            return self._error(429, message, "requests", "rate_limit_exceeded", headers=headers)
        if kind == "401":
            return self._error(401, "Incorrect API key provided.", code="invalid_api_key")
        if kind == "400":
            return self._error(400, "Invalid request (injected fault).")
        if kind == "503":
            message = "The engine is currently overloaded, please try again later."
            return self._error(503, message, type_="server_error")
        message = "The server had an error while processing your request."
        return self._error(int(kind), message, type_="server_error")

    def _unknown_model(self, model: str, status: int) -> web.Response:
        if status == 404:
            message = f"The model `{model}` does not exist or you do not have access to it."
            return self._error(404, message, code="model_not_found")
        message = (
            f"litellm.BadRequestError: Invalid model name passed in model={model}. "
            "Call `/v1/models` to view available models for your key."
        )
        return self._error(400, message, code="400", param="model")

    def _rate_capped(self, wait_s: float, rps: float) -> web.Response:
        millis = max(1, math.ceil(wait_s * 1000))
        headers = {
            "Retry-After": str(max(1, math.ceil(wait_s))),
            "retry-after-ms": str(millis),
            "x-ratelimit-limit-requests": f"{rps:g}",
            "x-ratelimit-remaining-requests": "0",
            "x-ratelimit-reset-requests": f"{millis}ms",
        }
        message = f"Rate limit reached: limit {rps:g} requests/s. Please try again in {millis}ms."
        return self._error(429, message, "requests", "rate_limit_exceeded", headers=headers)

    def _completion(
        self, body: dict[str, Any], prompt: str, key: bytes, latency_s: float
    ) -> web.Response:
        reply = chat_completion(body, prompt, key, self.config.model)
        usage = reply["usage"]
        factor = self.config.usage_factor
        if factor is not None:
            ceiling = body.get("max_tokens")
            if not isinstance(ceiling, int) or isinstance(ceiling, bool) or ceiling < 1:
                ceiling = DEFAULT_COMPLETION_TOKENS
            usage["prompt_tokens"] = round(factor * usage["prompt_tokens"])
            usage["completion_tokens"] = round(factor * ceiling)
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        self.recorder.completed(key, time.monotonic(), usage["total_tokens"])
        self.recorder.responded(200)
        headers = {"openai-processing-ms": str(round(latency_s * 1000))}
        if self._bucket is not None:
            headers |= self._bucket.headers()
        return web.json_response(reply, headers=headers)

    def _error(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        code: str | None = None,
        *,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> web.Response:
        self.recorder.responded(status)
        message += self.config.error_suffix_text
        error = {"message": message, "type": type_, "param": param, "code": code}
        return web.json_response({"error": error}, status=status, headers=headers)

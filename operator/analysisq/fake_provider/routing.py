"""Request helpers the fake provider's routes share: the presented API key and error bodies
in each API's shape (OpenAI ``{"error": {...}}``, Anthropic ``{"type": "error", ...}``)."""

from __future__ import annotations

from aiohttp import web

from analysisq.fake_provider.config import FakeConfig


def presented_key(request: web.Request) -> str | None:
    """The key of ``Authorization: Bearer`` (OpenAI) or ``x-api-key`` (Anthropic)."""
    auth = request.headers.get("Authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return request.headers.get("x-api-key")


def authorized(request: web.Request, config: FakeConfig) -> bool:
    return config.require_api_key is None or presented_key(request) == config.require_api_key


def openai_error(
    status: int, message: str, type_: str = "invalid_request_error", code: str | None = None
) -> web.Response:
    error = {"message": message, "type": type_, "param": None, "code": code}
    return web.json_response({"error": error}, status=status)


def anthropic_error(status: int, type_: str, message: str) -> web.Response:
    body = {"type": "error", "error": {"type": type_, "message": message}}
    return web.json_response(body, status=status)

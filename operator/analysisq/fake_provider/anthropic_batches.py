"""Anthropic's Message Batches API on the fake provider: ``/v1/messages/batches``.

``POST /v1/messages/batches`` (``requests[]`` of ``custom_id`` + ``params``; validated at
once as Anthropic does: ``custom_id`` must match ``^[a-zA-Z0-9_-]{1,64}$`` and be unique,
at most 100,000 requests), ``GET /v1/messages/batches/{id}``, ``POST .../{id}/cancel``,
``GET /v1/messages/batches?limit=&after_id=&before_id=`` and ``GET .../{id}/results`` (the
``results_url``: JSONL of ``succeeded | errored | canceled | expired``). A batch that
``batch_fail_first`` refuses is a 429 at create (the queue of batch requests is full).
"""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from analysisq.fake_provider.answers import anthropic_message, last_user_message
from analysisq.fake_provider.batches import (
    ENDED,
    BatchBook,
    BatchRequest,
    FakeBatch,
    Outcome,
    corrupt_lines,
    drop_fields,
    padded,
)
from analysisq.fake_provider.routing import anthropic_error, authorized
from analysisq.fake_provider.stats import prompt_key

MAX_REQUESTS = 100_000
CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_ROOT = "/v1/messages/batches"
_DAY = 86_400
_ERRORS: dict[str, tuple[str, str]] = {
    "400": ("invalid_request_error", "Invalid request (injected batch fault)."),
    "429": ("rate_limit_error", "Rate limited (injected batch fault)."),
    "500": ("api_error", "Internal server error (injected batch fault)."),
}


class AnthropicBatches:
    """The routes, over one ``BatchBook``."""

    def __init__(self, book: BatchBook) -> None:
        self.book = book

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post(_ROOT, self.create)
        app.router.add_get(_ROOT, self.list)
        app.router.add_get(_ROOT + "/{id}", self.retrieve)
        app.router.add_post(_ROOT + "/{id}/cancel", self.cancel)
        app.router.add_get(_ROOT + "/{id}/results", self.results)

    async def create(self, request: web.Request) -> web.Response:
        if not authorized(request, self.book.config):
            return anthropic_error(401, "authentication_error", "invalid x-api-key")
        try:
            body = await request.json()
        except ValueError:
            return anthropic_error(400, "invalid_request_error", "The body is not valid JSON.")
        entries = body.get("requests") if isinstance(body, dict) else None
        requests, problem = _parse_requests(entries)
        if problem is not None:
            return anthropic_error(400, "invalid_request_error", problem)
        await self.book.delay(self.book.config.batch_delay_before_create_s)
        fate = self.book.next_fate()
        if fate == "fail":
            message = "Number of batch requests in the queue exceeds your limit; retry later."
            return anthropic_error(429, "rate_limit_error", message)
        batch = self.book.create("anthropic", requests, fate)
        await self.book.delay(self.book.config.batch_delay_after_create_s)
        return web.json_response(self._object(batch, time.time(), request))

    async def retrieve(self, request: web.Request) -> web.Response:
        batch = self._find(request)
        if isinstance(batch, web.Response):
            return batch
        return web.json_response(self._object(batch, time.time(), request))

    async def cancel(self, request: web.Request) -> web.Response:
        batch = self._find(request)
        if isinstance(batch, web.Response):
            return batch
        now = time.time()
        if self.book.settle(batch, now) in ENDED:
            message = f"Batch {batch.id} has already ended and cannot be canceled."
            return anthropic_error(400, "invalid_request_error", message)
        if batch.cancel_at is None:
            batch.cancel_at = now
        return web.json_response(self._object(batch, now, request))

    async def list(self, request: web.Request) -> web.Response:
        if not authorized(request, self.book.config):
            return anthropic_error(401, "authentication_error", "invalid x-api-key")
        try:
            limit = min(1000, max(1, int(request.query.get("limit", "20"))))
        except ValueError:
            return anthropic_error(400, "invalid_request_error", "limit must be an integer")
        page, more = self.book.newest_first(
            "anthropic", limit, request.query.get("after_id"), lambda b: True
        )
        now = time.time()
        data = [self._object(b, now, request) for b in page]
        first, last = (data[0]["id"], data[-1]["id"]) if data else (None, None)
        return web.json_response(
            {"data": data, "has_more": more, "first_id": first, "last_id": last}
        )

    async def results(self, request: web.Request) -> web.StreamResponse:
        batch = self._find(request)
        if isinstance(batch, web.Response):
            return batch
        if self.book.settle(batch, time.time()) not in ENDED or batch.results is None:
            message = f"Batch {batch.id} has not ended yet; its results are not available."
            return anthropic_error(400, "invalid_request_error", message)
        # Written line by line: a 200 MB+ file (padding) is never built whole here either.
        response = web.StreamResponse(headers={"Content-Type": "application/binary"})
        await response.prepare(request)
        for r, o in batch.results:
            await response.write(padded(self.book.config, _result_line(r, o)))
        if self.book.config.batch_corrupt_results and batch.results:
            first = [_result_line(*batch.results[0])]
            for line in corrupt_lines(first):
                await response.write(line)
        await response.write_eof()
        return response

    def _find(self, request: web.Request) -> FakeBatch | web.Response:
        if not authorized(request, self.book.config):
            return anthropic_error(401, "authentication_error", "invalid x-api-key")
        batch = self.book.find(request.match_info["id"], time.time())
        if batch is None or batch.api != "anthropic":
            message = f"No message batch with id {request.match_info['id']!r}."
            return anthropic_error(404, "not_found_error", message)
        return batch

    def _object(self, batch: FakeBatch, now: float, request: web.Request) -> dict[str, Any]:
        phase = self.book.settle(batch, now)
        ended = phase in ENDED
        counts = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        if ended:
            for _, outcome in batch.results or ():
                counts[_result_type(outcome)] += 1
        else:
            counts["processing"] = len(batch.requests)
        ended_at = batch.cancelled_at if batch.cancel_at is not None else batch.ends_at
        results_url = f"{request.scheme}://{request.host}{_ROOT}/{batch.id}/results"
        return drop_fields(
            self.book.config,
            {
                "id": batch.id,
                "type": "message_batch",
                "processing_status": "ended"
                if ended
                else ("canceling" if batch.cancel_at is not None else "in_progress"),
                "request_counts": counts,
                "ended_at": _rfc3339(ended_at) if ended and ended_at is not None else None,
                "created_at": _rfc3339(batch.created),
                "expires_at": _rfc3339(batch.created + _DAY),
                "archived_at": None,
                "cancel_initiated_at": _rfc3339(batch.cancel_at) if batch.cancel_at else None,
                "results_url": results_url if ended else None,
            },
        )


def _parse_requests(entries: Any) -> tuple[list[BatchRequest], str | None]:
    if not isinstance(entries, list) or not entries:
        return [], "requests: a non-empty list of {custom_id, params} is required."
    if len(entries) > MAX_REQUESTS:
        return [], f"requests: at most {MAX_REQUESTS} requests per batch."
    requests: list[BatchRequest] = []
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        custom_id = entry.get("custom_id") if isinstance(entry, dict) else None
        params = entry.get("params") if isinstance(entry, dict) else None
        if not isinstance(custom_id, str) or not CUSTOM_ID.match(custom_id):
            return [], f"requests.{index}.custom_id: must match ^[a-zA-Z0-9_-]{{1,64}}$."
        if custom_id in seen:
            return [], f"requests.{index}.custom_id: duplicate custom_id {custom_id!r}."
        prompt = last_user_message(params)
        if (
            not isinstance(params, dict)
            or prompt is None
            or not isinstance(params.get("model"), str)
            or not isinstance(params.get("max_tokens"), int)
        ):
            return [], f"requests.{index}.params: model, max_tokens and messages are required."
        seen.add(custom_id)
        requests.append(BatchRequest(custom_id, params, prompt, prompt_key(prompt)))
    return requests, None


def _result_type(outcome: Outcome) -> str:
    if outcome == "ok":
        return "succeeded"
    if outcome == "expired":
        return "expired"
    if outcome == "cancelled":
        return "canceled"
    return "errored"


def _result_line(request: BatchRequest, outcome: Outcome) -> bytes:
    kind = _result_type(outcome)
    result: dict[str, Any] = {"type": kind}
    if kind == "succeeded":
        result["message"] = anthropic_message(request.body, request.prompt, request.key)
    elif kind == "errored":
        type_, message = _ERRORS[outcome]
        result["error"] = {"type": "error", "error": {"type": type_, "message": message}}
    return json.dumps({"custom_id": request.custom_id, "result": result}).encode() + b"\n"


def _rfc3339(stamp: float) -> str:
    return datetime.fromtimestamp(stamp, UTC).isoformat().replace("+00:00", "Z")

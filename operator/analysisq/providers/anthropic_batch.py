"""Anthropic's Message Batches API for one target.

``submit``: ``POST {endpoint}/v1/messages/batches`` with ``requests[]`` of ``custom_id`` and
``params`` (the sync path's body), written to a spool and streamed from it. ``find`` lists
``GET /v1/messages/batches`` newest first (Anthropic batches carry no metadata): a batch
created since the intent, holding as many requests, that no other submission owns.
``poll`` reads ``GET .../{id}`` until ``processing_status`` is ``ended``; ``results``
streams its ``results_url`` (JSONL of ``succeeded | errored | canceled | expired``). The
API key goes only to the endpoint's own host: a ``results_url`` elsewhere is fetched
without it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from datetime import datetime
from typing import Any

import httpx

from analysisq.errors import PermanentError, TransientError
from analysisq.providers.anthropic import AnthropicProvider
from analysisq.providers.batch import (
    BatchEntry,
    BatchHttp,
    BatchInput,
    BatchResult,
    BatchState,
    MalformedBatch,
    file_chunks,
    request_counts,
)
from analysisq.providers.batch_json import request_json
from analysisq.providers.client import Reply, dig, stream_lines
from analysisq.providers.http_errors import error_for_response

#: An errored result's error type, as the HTTP status the sync API would have answered.
_STATUS_OF = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "overloaded_error": 529,
}
FIND_PAGES = 10
#: Anthropic's ceiling for a Message Batches request body, 256 MB (decimal).
MAX_BODY_BYTES = 256_000_000
_HEAD, _TAIL = b'{"requests":[', b"]}"
#: The body around the requests, less the one comma that ``entry_bytes`` counts for the last
#: request (and ``spool`` drops).
_ENVELOPE = len(_HEAD + _TAIL) - 1


class AnthropicBatchClient(BatchHttp):
    """Message Batches calls for one target, over its sync provider and the shared client."""

    def __init__(
        self, provider: AnthropicProvider, client: httpx.AsyncClient, api_key: str | None
    ) -> None:
        super().__init__(provider, client, api_key)
        self.provider = provider
        self._base = provider.url + "/batches"

    def request(self, entry: BatchEntry) -> dict[str, Any]:
        return {"custom_id": entry.custom_id, "params": self.provider.payload(entry.prompt)}

    def encoded(self, entry: BatchEntry) -> bytes:
        """*entry* as it stands in the body."""
        record = self.request(entry)
        return request_json(record, record["params"], entry.prompt, separators=(",", ":"))

    def entry_bytes(self, entry: BatchEntry) -> bytes:
        """What *entry* adds to the body: its request and a comma."""
        return self.encoded(entry) + b","

    def spool(self) -> BatchInput:
        # {"requests":[<request>,<request>,...]}: the last request's comma is dropped.
        return BatchInput(self.entry_bytes, head=_HEAD, tail=_TAIL, drop_last=1)

    @property
    def max_input_bytes(self) -> int:
        return MAX_BODY_BYTES - _ENVELOPE

    async def submit(self, body: BatchInput, metadata: Mapping[str, str]) -> str:
        # Written request by request to the spool (``batch_send``) and streamed from it:
        # the body (up to 256 MB) is never built whole, neither as objects nor as bytes.
        spool, size = body.finish()
        headers = {"content-type": "application/json", "content-length": str(size)}
        reply, answer = await self._call(
            "POST", self._base, headers=headers, content=file_chunks(spool)
        )
        return str(dig(reply, answer, "id", expect=str))

    async def find(
        self, metadata: Mapping[str, str], *, since: datetime, count: int, known: set[str]
    ) -> str | None:
        floor = since.timestamp() - 60
        after: str | None = None
        candidates: list[tuple[float, str]] = []
        for _ in range(FIND_PAGES):
            params: dict[str, Any] = {"limit": 100, **({"after_id": after} if after else {})}
            reply, page = await self._call("GET", self._base, params=params)
            batches = dig(reply, page, "data", expect=list)
            older = False
            for batch in batches:
                created = _timestamp(batch.get("created_at")) if isinstance(batch, dict) else None
                if created is None or created < floor:
                    older = True
                    continue
                if total_requests(batch) == count and batch.get("id") not in known:
                    candidates.append((created, str(batch["id"])))
            if older or not page.get("has_more") or not batches:
                break
            after = str(batches[-1].get("id"))
        # The earliest unowned batch of that size since the intent: the one we created first.
        return min(candidates)[1] if candidates else None

    async def poll(self, provider_id: str) -> BatchState:
        reply, body = await self._call("GET", f"{self._base}/{provider_id}")

        def malformed(field: str, problem: str, *, final: bool = False) -> MalformedBatch:
            return MalformedBatch(
                "anthropic", provider_id, reply.where, field, problem, final=final
            )

        status = body.get("processing_status")
        if not isinstance(status, str):
            raise malformed("processing_status", "is missing")
        counts, missing = request_counts(body)
        if status in ("in_progress", "canceling"):
            return BatchState(provider_id, "open", status, counts, missing=missing)
        if status == "ended":
            url = body.get("results_url")
            if not isinstance(url, str) or not url:
                raise malformed("results_url", "is missing on an ended batch", final=True)
            return BatchState(provider_id, "ended", status, counts, outputs=(url,), missing=missing)
        raise malformed("processing_status", f"is {status!r}, which no Anthropic batch has")

    async def cancel(self, provider_id: str) -> None:
        await self._cancel(f"{self._base}/{provider_id}/cancel")

    async def results(self, state: BatchState) -> AsyncIterator[BatchResult]:
        for url in state.outputs:
            same_host = httpx.URL(url).host == httpx.URL(self._base).host
            headers = self.provider.headers() if same_host else {}
            reply = Reply("", 0.0, str(httpx.URL(url).copy_with(query=None)), self._secrets)
            async for raw in stream_lines(
                self._client, url, headers=headers, timeout_s=self._timeout, secrets=self._secrets
            ):
                if raw.strip():
                    yield self._result(reply, raw)

    def _result(self, reply: Reply, raw: str) -> BatchResult:
        try:
            line = json.loads(raw)
        except ValueError:
            return BatchResult(None, problem=f"a result line of {reply.where} is not JSON")
        cid = line.get("custom_id") if isinstance(line, dict) else None
        result = line.get("result") if isinstance(line, dict) else None
        if not isinstance(cid, str) or not isinstance(result, dict):
            return BatchResult(None, problem=f"a result line of {reply.where} has no custom_id")
        kind = result.get("type")
        here = Reply("", 0.0, f"{reply.where} ({cid})", self._secrets)
        if kind in ("expired", "canceled"):
            return BatchResult(cid, unspent=True)
        if kind == "succeeded":
            try:
                return BatchResult(cid, completion=self.provider.parse(here, result.get("message")))
            except (TransientError, PermanentError) as exc:
                return BatchResult(cid, error=exc)
        if kind == "errored":
            outer = result.get("error")
            inner = outer.get("error") if isinstance(outer, dict) else None
            type_ = inner.get("type") if isinstance(inner, dict) else None
            status = _STATUS_OF.get(str(type_), 500)
            text = json.dumps(outer) if outer is not None else ""
            error = error_for_response(status, {}, text, where=here.where, secrets=self._secrets)
            return BatchResult(cid, error=error)
        return BatchResult(cid, problem=f"result {cid} of {reply.where}: unknown type {kind!r}")


def total_requests(batch: dict[str, Any]) -> int:
    """Requests in a batch: the sum of its request counts (every state)."""
    counts = batch.get("request_counts")
    if not isinstance(counts, dict):
        return -1
    return sum(v for v in counts.values() if isinstance(v, int))


def _timestamp(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None

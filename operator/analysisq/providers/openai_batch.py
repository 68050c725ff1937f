"""OpenAI's Batch API for one target: a JSONL file of chat completions, then a batch.

``submit``: ``POST {base}/files`` (multipart, ``purpose=batch``) with one line per entry
(``custom_id``, ``POST /v1/chat/completions``, the sync path's body), then ``POST
{base}/batches`` with ``completion_window=24h`` and ``metadata`` naming the run and the
submission. ``find`` pages ``GET {base}/batches`` for that metadata. ``poll`` reads ``GET
{base}/batches/{id}``; ``results`` streams the output file, then the error file, from
``GET {base}/files/{id}/content``. ``{base}`` is the target's endpoint (default
``https://api.openai.com/v1``), so any server with ``/v1/files`` + ``/v1/batches`` works.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from datetime import datetime
from typing import Any

import httpx

from analysisq.errors import PermanentError, RateLimited, TransientError
from analysisq.providers.batch import (
    BatchEntry,
    BatchHttp,
    BatchInput,
    BatchResult,
    BatchState,
    MalformedBatch,
    request_counts,
)
from analysisq.providers.batch_json import request_json
from analysisq.providers.client import Reply, dig, stream_lines
from analysisq.providers.http_errors import error_for_response
from analysisq.providers.openai import OpenAIProvider

ENDPOINT = "/v1/chat/completions"
#: OpenAI's statuses, by what they mean for the queue.
_OPEN = frozenset({"validating", "in_progress", "finalizing", "cancelling"})
_ENDED = frozenset({"completed", "expired", "cancelled"})
#: Error-file codes of requests that never ran: their items go back unspent.
_UNSPENT = frozenset({"batch_expired", "batch_cancelled"})
#: Pages of ``GET /batches`` that ``find`` reads at most (100 batches each).
FIND_PAGES = 20
#: OpenAI's ceiling for a batch input file, 200 MB (counted in decimal megabytes, the
#: smaller reading): ``batch.maxBytes`` allows 256 MB, for Anthropic.
MAX_FILE_BYTES = 200_000_000
#: Back-pressure after ``token_limit_exceeded``: no new batch for the target before this.
TOKEN_LIMIT_DELAY_S = 60.0


class OpenAIBatchClient(BatchHttp):
    """Batch API calls for one target, over its sync provider and the shared client."""

    def __init__(
        self, provider: OpenAIProvider, client: httpx.AsyncClient, api_key: str | None
    ) -> None:
        super().__init__(provider, client, api_key)
        self.provider = provider
        self._base = provider.url.removesuffix("/chat/completions")

    def line(self, entry: BatchEntry) -> bytes:
        body = self.provider.payload(entry.prompt)
        record = {"custom_id": entry.custom_id, "method": "POST", "url": ENDPOINT, "body": body}
        return request_json(record, body, entry.prompt) + b"\n"

    def spool(self) -> BatchInput:
        return BatchInput(self.line)

    @property
    def max_input_bytes(self) -> int:
        return MAX_FILE_BYTES

    async def submit(self, body: BatchInput, metadata: Mapping[str, str]) -> str:
        # The JSONL was spooled line by line as it was written (``batch_send``): streamed
        # from the spool, never held (nor copied) whole.
        spool, _ = body.finish()
        files = {"file": ("analysisq-batch.jsonl", spool, "application/jsonl")}
        upload = await self._call(
            "POST", f"{self._base}/files", data={"purpose": "batch"}, files=files
        )
        file_id = dig(upload[0], upload[1], "id", expect=str)
        payload = {
            "input_file_id": file_id,
            "endpoint": ENDPOINT,
            "completion_window": "24h",
            "metadata": dict(metadata),
        }
        reply, batch = await self._call("POST", f"{self._base}/batches", json=payload)
        return str(dig(reply, batch, "id", expect=str))

    async def find(
        self, metadata: Mapping[str, str], *, since: datetime, count: int, known: set[str]
    ) -> str | None:
        after: str | None = None
        floor = since.timestamp() - 60
        for _ in range(FIND_PAGES):
            params: dict[str, Any] = {"limit": 100, **({"after": after} if after else {})}
            reply, page = await self._call("GET", f"{self._base}/batches", params=params)
            batches = dig(reply, page, "data", expect=list)
            for batch in batches:
                tags = batch.get("metadata") if isinstance(batch, dict) else None
                if isinstance(tags, dict) and all(tags.get(k) == v for k, v in metadata.items()):
                    return str(batch.get("id"))
            oldest = batches[-1].get("created_at", 0) if batches else 0
            if not page.get("has_more") or not batches or float(oldest) < floor:
                return None
            after = str(batches[-1].get("id"))
        return None

    async def poll(self, provider_id: str) -> BatchState:
        reply, body = await self._call("GET", f"{self._base}/batches/{provider_id}")

        def malformed(field: str, problem: str, *, final: bool = False) -> MalformedBatch:
            return MalformedBatch("openai", provider_id, reply.where, field, problem, final=final)

        status = body.get("status")
        if not isinstance(status, str):
            raise malformed("status", "is missing")
        counts, missing = request_counts(body)
        if status in _OPEN:
            return BatchState(provider_id, "open", status, counts, missing=missing)
        if status in _ENDED:
            output, errors = body.get("output_file_id"), body.get("error_file_id")
            outputs = tuple(f for f in (output, errors) if isinstance(f, str) and f)
            # A completed batch has its answers in the output file unless its counts say
            # none succeeded (then only the error file); expired or cancelled batches may
            # have run nothing at all.
            answered = counts.get("completed") != 0
            if status == "completed" and answered and output not in outputs:
                raise malformed("output_file_id", "is missing on a completed batch", final=True)
            return BatchState(
                provider_id, "ended", status, counts, outputs=outputs, missing=missing
            )
        if status == "failed":
            return BatchState(provider_id, "failed", status, counts, _failure(reply, body))
        raise malformed("status", f"is {status!r}, which no OpenAI batch has")

    async def cancel(self, provider_id: str) -> None:
        await self._cancel(f"{self._base}/batches/{provider_id}/cancel")

    async def results(self, state: BatchState) -> AsyncIterator[BatchResult]:
        for file_id in state.outputs:
            where = f"{self._base}/files/{file_id}/content"
            reply = Reply("", 0.0, where, self._secrets)
            async for raw in stream_lines(
                self._client,
                where,
                headers=self.provider.headers(),
                timeout_s=self._timeout,
                secrets=self._secrets,
            ):
                if raw.strip():
                    yield self._result(reply, raw)

    def _result(self, reply: Reply, raw: str) -> BatchResult:
        try:
            line = json.loads(raw)
        except ValueError:
            return BatchResult(None, problem=f"a result line of {reply.where} is not JSON")
        cid = line.get("custom_id") if isinstance(line, dict) else None
        if not isinstance(cid, str):
            return BatchResult(None, problem=f"a result line of {reply.where} has no custom_id")
        error, response = line.get("error"), line.get("response")
        if isinstance(error, dict) and error.get("code") in _UNSPENT:
            return BatchResult(cid, unspent=True)
        if not isinstance(response, dict) or not isinstance(response.get("status_code"), int):
            return BatchResult(cid, problem=f"result {cid} of {reply.where} has no response")
        status, body = response["status_code"], response.get("body")
        here = Reply("", 0.0, f"{reply.where} ({cid})", self._secrets)
        if status != 200:
            text = json.dumps(body) if body is not None else ""
            error_ = error_for_response(status, {}, text, where=here.where, secrets=self._secrets)
            return BatchResult(cid, error=error_)
        try:
            return BatchResult(cid, completion=self.provider.parse(here, body))
        except (TransientError, PermanentError) as exc:
            return BatchResult(cid, error=exc)


def _failure(reply: Reply, body: dict[str, Any]) -> RateLimited | PermanentError:
    errors = body.get("errors")
    data = errors.get("data") if isinstance(errors, dict) else None
    first = data[0] if isinstance(data, list) and data and isinstance(data[0], dict) else {}
    code, message = str(first.get("code") or "unknown"), str(first.get("message") or "")
    text = f"batch failed at {reply.where}: {code}: {message}".strip()
    if code == "token_limit_exceeded":
        return RateLimited(text, delay=TOKEN_LIMIT_DELAY_S)
    return PermanentError(text)

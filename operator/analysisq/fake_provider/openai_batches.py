"""OpenAI's Batch API on the fake provider: ``/v1/files`` and ``/v1/batches``.

``POST /v1/files`` (multipart, ``purpose=batch``, at most 200 MB), ``GET /v1/files/{id}``,
``GET /v1/files/{id}/content``; ``POST /v1/batches`` (``input_file_id``, ``endpoint``,
``completion_window=24h``, ``metadata``), ``GET /v1/batches/{id}``, ``POST
/v1/batches/{id}/cancel``, ``GET /v1/batches?limit=&after=``. The input file is validated at
create the way OpenAI does it, as the batch's ``failed`` status with ``errors`` (a line that
is not JSON, a missing field, a duplicate ``custom_id``, more than one model, more than
50,000 requests), never as an HTTP error. Answers come from ``answers``, the timeline from
``batches``.
"""

from __future__ import annotations

import json
import time
from typing import Any

from aiohttp import web

from analysisq.fake_provider.answers import chat_completion, last_user_message
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
from analysisq.fake_provider.routing import authorized, openai_error
from analysisq.fake_provider.stats import prompt_key

MAX_FILE_BYTES = 200 * 1024 * 1024
MAX_REQUESTS = 50_000
#: File contents are written in chunks of this size.
CHUNK_BYTES = 2**20
ENDPOINT = "/v1/chat/completions"
_DAY = 86_400
_ERRORS: dict[str, tuple[str, str]] = {
    "400": ("invalid_request_error", "Invalid request (injected batch fault)."),
    "429": ("rate_limit_error", "Rate limit reached (injected batch fault)."),
    "500": ("server_error", "The server had an error processing this request."),
}


class OpenAIBatches:
    """The routes, over one ``BatchBook``."""

    def __init__(self, book: BatchBook) -> None:
        self.book = book

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/files", self.upload)
        app.router.add_get("/v1/files/{id}", self.file)
        app.router.add_get("/v1/files/{id}/content", self.content)
        app.router.add_post("/v1/batches", self.create)
        app.router.add_get("/v1/batches", self.list)
        app.router.add_get("/v1/batches/{id}", self.retrieve)
        app.router.add_post("/v1/batches/{id}/cancel", self.cancel)

    async def upload(self, request: web.Request) -> web.Response:
        if not authorized(request, self.book.config):
            return openai_error(401, "Incorrect API key provided.", code="invalid_api_key")
        form = await request.post()
        upload, purpose = form.get("file"), form.get("purpose")
        if purpose != "batch":
            return openai_error(400, f"purpose must be 'batch', got {purpose!r}")
        if not isinstance(upload, web.FileField):
            return openai_error(400, "a multipart 'file' field is required")
        data = upload.file.read()
        if len(data) > MAX_FILE_BYTES:
            return openai_error(400, "File is larger than 200 MB.", code="file_too_large")
        file = self.book.add_file(upload.filename, "batch", data)
        return web.json_response(_file_object(file.id, self.book))

    async def file(self, request: web.Request) -> web.Response:
        if not authorized(request, self.book.config):
            return openai_error(401, "Incorrect API key provided.", code="invalid_api_key")
        file_id = request.match_info["id"]
        if file_id not in self.book.files:
            return openai_error(404, f"No such File object: {file_id}")
        return web.json_response(_file_object(file_id, self.book))

    async def content(self, request: web.Request) -> web.StreamResponse:
        if not authorized(request, self.book.config):
            return openai_error(401, "Incorrect API key provided.", code="invalid_api_key")
        file = self.book.files.get(request.match_info["id"])
        if file is None:
            return openai_error(404, f"No such File object: {request.match_info['id']}")
        # In chunks: a 200 MB+ file is not copied whole into the transport's buffer.
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await response.prepare(request)
        view = memoryview(file.data)
        for start in range(0, len(view), CHUNK_BYTES):
            await response.write(view[start : start + CHUNK_BYTES])
        await response.write_eof()
        return response

    async def create(self, request: web.Request) -> web.Response:
        if not authorized(request, self.book.config):
            return openai_error(401, "Incorrect API key provided.", code="invalid_api_key")
        try:
            body = await request.json()
        except ValueError:
            return openai_error(400, "We could not parse the JSON body of your request.")
        if not isinstance(body, dict):
            return openai_error(400, "The body must be a JSON object.")
        file = self.book.files.get(str(body.get("input_file_id")))
        if file is None:
            return openai_error(400, f"No such File object: {body.get('input_file_id')}")
        if body.get("endpoint") != ENDPOINT:
            return openai_error(400, f"endpoint must be {ENDPOINT}")
        if body.get("completion_window") != "24h":
            return openai_error(400, "completion_window must be '24h'")
        metadata = body.get("metadata") or {}
        if not isinstance(metadata, dict) or len(metadata) > 16:
            return openai_error(400, "metadata must be an object of at most 16 strings")
        requests, failure = _parse_input(file.data)
        await self.book.delay(self.book.config.batch_delay_before_create_s)
        fate = self.book.next_fate()
        if failure is None and fate == "fail":
            failure = (
                "token_limit_exceeded",
                "Enqueued token limit reached for this model in organization fake. "
                "Please try again once some in_progress batches have been completed.",
                None,
            )
        batch = self.book.create(
            "openai",
            requests if failure is None else [],
            "fail" if failure else fate,
            metadata={str(k): str(v) for k, v in metadata.items()},
            input_file_id=file.id,
            failure=failure,
        )
        await self.book.delay(self.book.config.batch_delay_after_create_s)
        return web.json_response(self._object(batch, time.time()))

    async def retrieve(self, request: web.Request) -> web.Response:
        if not authorized(request, self.book.config):
            return openai_error(401, "Incorrect API key provided.", code="invalid_api_key")
        now = time.time()
        batch = self.book.find(request.match_info["id"], now)
        if batch is None or batch.api != "openai":
            return openai_error(404, f"No batch found with id '{request.match_info['id']}'.")
        return web.json_response(self._object(batch, now))

    async def cancel(self, request: web.Request) -> web.Response:
        if not authorized(request, self.book.config):
            return openai_error(401, "Incorrect API key provided.", code="invalid_api_key")
        now = time.time()
        batch = self.book.find(request.match_info["id"], now)
        if batch is None or batch.api != "openai":
            return openai_error(404, f"No batch found with id '{request.match_info['id']}'.")
        phase = self.book.settle(batch, now)
        if phase in ENDED:
            return openai_error(400, f"Cannot cancel a batch with status '{phase}'.")
        if batch.cancel_at is None:
            batch.cancel_at = now
        return web.json_response(self._object(batch, now))

    async def list(self, request: web.Request) -> web.Response:
        if not authorized(request, self.book.config):
            return openai_error(401, "Incorrect API key provided.", code="invalid_api_key")
        try:
            limit = min(100, max(1, int(request.query.get("limit", "20"))))
        except ValueError:
            return openai_error(400, "limit must be an integer")
        page, more = self.book.newest_first(
            "openai", limit, request.query.get("after"), lambda b: True
        )
        now = time.time()
        data = [self._object(b, now) for b in page]
        first, last = (data[0]["id"], data[-1]["id"]) if data else (None, None)
        return web.json_response(
            {"object": "list", "data": data, "first_id": first, "last_id": last, "has_more": more}
        )

    def _object(self, batch: FakeBatch, now: float) -> dict[str, Any]:
        phase = self.book.settle(batch, now)
        if phase in ENDED and batch.results is not None and batch.output_file_id is None:
            self._write_files(batch)
        stamp = int(batch.created)
        outcomes = batch.outcomes(now)[: batch.answered(now)]
        ok = sum(1 for o in outcomes if o == "ok")
        failed = len(batch.requests) - ok if phase in ENDED else len(outcomes) - ok

        def at(when: float | None, reached: bool) -> int | None:
            return int(when) if when is not None and reached else None

        cancelled_at = batch.cancelled_at
        errors = None
        if batch.failure is not None:
            code, message, line = batch.failure
            error = {"code": code, "message": message, "param": None, "line": line}
            errors = {"object": "list", "data": [error]}
        return drop_fields(
            self.book.config,
            {
                "id": batch.id,
                "object": "batch",
                "endpoint": ENDPOINT,
                "model": batch.requests[0].body.get("model") if batch.requests else None,
                "errors": errors,
                "input_file_id": batch.input_file_id,
                "completion_window": "24h",
                "status": phase,
                "output_file_id": batch.output_file_id,
                "error_file_id": batch.error_file_id,
                "created_at": stamp,
                "in_progress_at": at(
                    batch.validated_at, batch.fate != "fail" and now >= batch.validated_at
                ),
                "expires_at": stamp + _DAY,
                "finalizing_at": at(
                    batch.processed_at, phase in ("finalizing", "completed", "expired")
                ),
                "completed_at": at(batch.ends_at, phase == "completed"),
                "failed_at": at(batch.validated_at, phase == "failed"),
                "expired_at": at(batch.ends_at, phase == "expired"),
                "cancelling_at": at(batch.cancel_at, batch.cancel_at is not None),
                "cancelled_at": at(cancelled_at, phase == "cancelled"),
                "request_counts": {"total": len(batch.requests), "completed": ok, "failed": failed},
                "metadata": batch.metadata,
            },
        )

    def _write_files(self, batch: FakeBatch) -> None:
        """The output file (answers) and the error file (every other outcome), as OpenAI
        splits them; a file with no line is not created."""
        output: list[bytes] = []
        errors: list[bytes] = []
        for request, outcome in batch.results or ():
            line = padded(self.book.config, _result_line(request, outcome, self.book.config.model))
            (output if outcome == "ok" else errors).append(line)
        if self.book.config.batch_corrupt_results:
            output += corrupt_lines(output)
        if output:
            batch.output_file_id = self.book.add_file(
                f"{batch.id}_output.jsonl", "batch_output", b"".join(output)
            ).id
        if errors:
            batch.error_file_id = self.book.add_file(
                f"{batch.id}_error.jsonl", "batch_output", b"".join(errors)
            ).id


def _parse_input(data: bytes) -> tuple[list[BatchRequest], tuple[str, str, int | None] | None]:
    """The requests of an input file, or why OpenAI's validation would fail it."""
    requests: list[BatchRequest] = []
    seen: set[str] = set()
    models: set[str] = set()
    for number, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except ValueError:
            return [], ("invalid_json_line", f"Line {number} is not valid JSON.", number)
        custom_id = line.get("custom_id") if isinstance(line, dict) else None
        body = line.get("body") if isinstance(line, dict) else None
        if not isinstance(custom_id, str) or not custom_id or not isinstance(body, dict):
            return [], (
                "missing_required_parameter",
                f"Line {number}: custom_id and body are required.",
                number,
            )
        if line.get("method") != "POST" or line.get("url") != ENDPOINT:
            return [], ("invalid_url", f"Line {number}: expected POST {ENDPOINT}.", number)
        if custom_id in seen:
            message = f"Line {number}: the custom_id {custom_id!r} is used more than once."
            return [], ("duplicate_custom_id", message, number)
        prompt = last_user_message(body)
        if prompt is None or not isinstance(body.get("model"), str):
            return [], ("invalid_request", f"Line {number}: body needs model and messages.", number)
        seen.add(custom_id)
        models.add(body["model"])
        if len(models) > 1:
            return [], ("mismatched_model", "A batch input file may name one model only.", number)
        requests.append(BatchRequest(custom_id, body, prompt, prompt_key(prompt)))
    if not requests:
        return [], ("empty_file", "The input file has no requests.", None)
    if len(requests) > MAX_REQUESTS:
        return [], ("too_many_requests", f"At most {MAX_REQUESTS} requests per batch.", None)
    return requests, None


def _result_line(request: BatchRequest, outcome: Outcome, model: str) -> bytes:
    request_id = f"req_{prompt_key(request.custom_id).hex()[:24]}"
    line: dict[str, Any] = {"id": f"batch_{request_id}", "custom_id": request.custom_id}
    if outcome == "ok":
        body = chat_completion(request.body, request.prompt, request.key, model)
        line["response"] = {"status_code": 200, "request_id": request_id, "body": body}
        line["error"] = None
    elif outcome in _ERRORS:
        type_, message = _ERRORS[outcome]
        error = {"message": message, "type": type_, "param": None, "code": None}
        line["response"] = {
            "status_code": int(outcome),
            "request_id": request_id,
            "body": {"error": error},
        }
        line["error"] = None
    else:
        code = "batch_expired" if outcome == "expired" else "batch_cancelled"
        reason = "expired" if outcome == "expired" else "was cancelled"
        message = f"This request could not be executed before the batch {reason}."
        line["response"] = None
        line["error"] = {"code": code, "message": message}
    return json.dumps(line).encode() + b"\n"


def _file_object(file_id: str, book: BatchBook) -> dict[str, Any]:
    file = book.files[file_id]
    return {
        "id": file.id,
        "object": "file",
        "bytes": len(file.data),
        "created_at": file.created,
        "expires_at": None,
        "filename": file.filename,
        "purpose": file.purpose,
        "status": "processed",
        "status_details": None,
    }

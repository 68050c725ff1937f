"""The fake provider's batches: one timeline and one set of outcomes behind both Batch APIs.

A ``FakeBatch`` is created with its requests and a fate drawn from ``FakeConfig``
(``batch_expire_first``, ``batch_fail_first``) and, per request, an outcome from
``batch_errors``. Its state is a pure function of the wall clock: over ``batch_seconds`` it
validates (first 10%), processes its requests in order (to 80%), finalizes, then ends
``completed`` (or ``expired`` with about half answered, or ``failed`` at validation). A
cancel freezes the requests answered so far. When a batch is first seen ended its results
are built once (in a shuffled order: clients must match by ``custom_id``) and its answers
are counted as completions per prompt, so ``/stats`` shows any prompt answered twice.

``BatchBook`` holds every batch and file of one server; ``openai_batches`` and
``anthropic_batches`` translate it to each API's objects.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from analysisq.fake_provider.config import BATCH_ERROR_KINDS, FakeConfig
from analysisq.fake_provider.stats import Recorder

Phase = Literal[
    "validating",
    "in_progress",
    "finalizing",
    "completed",
    "failed",
    "expired",
    "cancelling",
    "cancelled",
]
Fate = Literal["complete", "expire", "fail"]
#: What happened to one request: answered (``ok``), a per-request error status, or never run.
Outcome = Literal["ok", "400", "429", "500", "expired", "cancelled"]
ENDED: frozenset[Phase] = frozenset({"completed", "failed", "expired", "cancelled"})


@dataclass(frozen=True)
class BatchRequest:
    """One request of a batch: its id, body, the prompt it asks and the counters' key."""

    custom_id: str
    body: dict[str, Any]
    prompt: str
    key: bytes


@dataclass
class FakeBatch:
    """One batch; ``phase``/``answered`` read its timeline, ``settle`` ends it once."""

    id: str
    api: Literal["openai", "anthropic"]
    requests: list[BatchRequest]
    #: Drawn at create: what each request will give when it is processed.
    draws: list[Outcome]
    fate: Fate
    created: float
    seconds: float
    metadata: dict[str, str] = field(default_factory=dict)
    #: OpenAI: the input file, and the output/error files once ended.
    input_file_id: str | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    #: Why validation failed: ``(code, message, line)``.
    failure: tuple[str, str, int | None] | None = None
    cancel_at: float | None = None
    #: Once ended: each request's outcome, in the shuffled order results are served.
    results: list[tuple[BatchRequest, Outcome]] | None = None

    @property
    def validated_at(self) -> float:
        return self.created + 0.1 * self.seconds

    @property
    def processed_at(self) -> float:
        return self.created + 0.8 * self.seconds

    @property
    def ends_at(self) -> float:
        return self.created + self.seconds

    @property
    def cancelled_at(self) -> float | None:
        """When a requested cancel completes."""
        if self.cancel_at is None:
            return None
        return self.cancel_at + min(1.0, 0.1 * self.seconds)

    def answered(self, now: float) -> int:
        """How many requests (in order) have been processed at *now*."""
        if self.fate == "fail":
            return 0
        if self.cancel_at is not None:
            now = min(now, self.cancel_at)
        span = self.processed_at - self.validated_at
        share = 1.0 if span <= 0 else min(1.0, max(0.0, (now - self.validated_at) / span))
        count = math.floor(share * len(self.requests))
        return min(count, len(self.requests) // 2) if self.fate == "expire" else count

    def phase(self, now: float) -> Phase:
        cancelled = self.cancelled_at
        if cancelled is not None:
            return "cancelled" if now >= cancelled else "cancelling"
        if now < self.validated_at:
            return "validating"
        if self.fate == "fail":
            return "failed"
        if now < self.processed_at:
            return "in_progress"
        if now < self.ends_at:
            return "finalizing"
        return "expired" if self.fate == "expire" else "completed"

    def outcomes(self, now: float) -> list[Outcome]:
        """Each request's outcome so far, in request order (unprocessed: ``expired`` or
        ``cancelled`` as the batch ended, else still ``expired`` as a placeholder)."""
        done = self.answered(now)
        rest: Outcome = "cancelled" if self.cancel_at is not None else "expired"
        return self.draws[:done] + [rest] * (len(self.requests) - done)

    def settle(self, now: float, rng: random.Random, recorder: Recorder) -> Phase:
        """The phase at *now*; the first time it is an end, build the results once."""
        phase = self.phase(now)
        if phase in ENDED and self.results is None:
            if self.fate == "fail":
                self.results = []
            else:
                self.results = list(zip(self.requests, self.outcomes(now), strict=True))
                rng.shuffle(self.results)
                stamp = time.monotonic()
                for request, outcome in self.results:
                    if outcome == "ok":
                        recorder.completed(request.key, stamp)
        return phase


def corrupt_lines(lines: list[bytes]) -> list[bytes]:
    """``batch_corrupt_results``: a line that is not JSON, a result for a ``custom_id`` that
    no request had (the first result under another id), and the first result again."""
    if not lines:
        return []
    unknown = {**json.loads(lines[0]), "custom_id": "1-" + "0" * 32}
    return [b'{"custom_id": "truncated\n', json.dumps(unknown).encode() + b"\n", lines[0]]


def padded(config: FakeConfig, line: bytes) -> bytes:
    """``batch_result_padding_bytes``: a result line with that much padding in a field of
    its own, which clients ignore."""
    if not config.batch_result_padding_bytes:
        return line
    pad = b',"x_padding":"' + b"x" * config.batch_result_padding_bytes + b'"}\n'
    return line.rstrip().removesuffix(b"}") + pad


def drop_fields(config: FakeConfig, obj: dict[str, Any]) -> dict[str, Any]:
    """``batch_drop_fields``: *obj* without them."""
    return {k: v for k, v in obj.items() if k not in config.batch_drop_fields}


@dataclass(frozen=True)
class FakeFile:
    """An uploaded or generated file (OpenAI ``/v1/files``)."""

    id: str
    filename: str
    purpose: str
    data: bytes
    created: int


class BatchBook:
    """Every batch and file of one fake provider, and the draws that shape new batches."""

    def __init__(self, config: FakeConfig, recorder: Recorder) -> None:
        self.config = config
        self.recorder = recorder
        self.batches: dict[str, FakeBatch] = {}
        self.files: dict[str, FakeFile] = {}
        self._rng = random.Random(config.seed)
        #: Creates seen so far, refused ones included: ``batch_*_first`` count these.
        self._creates = 0

    def configure(self, config: FakeConfig) -> None:
        self.config = config
        self._rng = random.Random(config.seed)

    def clear(self, recorder: Recorder) -> None:
        """Forget every batch and file (``POST /reset``); count into *recorder* from now on."""
        self.recorder = recorder
        self.batches.clear()
        self.files.clear()
        self._creates = 0

    async def delay(self, seconds: float) -> None:
        """Hold a request (``batch_delay_*``); aiohttp cancels it if the client hangs up."""
        if seconds > 0:
            await asyncio.sleep(seconds)

    def next_fate(self) -> Fate:
        """The fate of the next create, as ``batch_expire_first``/``batch_fail_first`` say."""
        index = self._creates
        self._creates += 1
        cfg = self.config
        if index < cfg.batch_expire_first:
            return "expire"
        if index < cfg.batch_expire_first + cfg.batch_fail_first:
            return "fail"
        return "complete"

    def create(
        self,
        api: Literal["openai", "anthropic"],
        requests: list[BatchRequest],
        fate: Fate,
        **fields: Any,
    ) -> FakeBatch:
        """Record a new batch (the fake's paid work: counted in ``/stats``)."""
        prefix = "batch_" if api == "openai" else "msgbatch_"
        batch = FakeBatch(
            id=prefix + uuid.uuid4().hex,
            api=api,
            requests=requests,
            draws=[self._draw() for _ in requests],
            fate=fate,
            created=time.time(),
            seconds=self.config.batch_seconds,
            **fields,
        )
        self.batches[batch.id] = batch
        self.recorder.batch_created(len(requests))
        for request in requests:
            self.recorder.prompt(request.key)
        return batch

    def find(self, batch_id: str, now: float) -> FakeBatch | None:
        """The batch, unless it does not exist yet for readers (``batch_not_found_s``)."""
        batch = self.batches.get(batch_id)
        if batch is None or now < batch.created + self.config.batch_not_found_s:
            return None
        return batch

    def settle(self, batch: FakeBatch, now: float) -> Phase:
        return batch.settle(now, self._rng, self.recorder)

    def add_file(self, filename: str, purpose: str, data: bytes) -> FakeFile:
        file = FakeFile("file-" + uuid.uuid4().hex[:24], filename, purpose, data, int(time.time()))
        self.files[file.id] = file
        return file

    def newest_first(
        self, api: str, limit: int, after: str | None, keep: Callable[[FakeBatch], bool]
    ) -> tuple[list[FakeBatch], bool]:
        """A page of *api*'s batches, newest first, strictly after the id *after*."""
        ordered = [b for b in reversed(self.batches.values()) if b.api == api and keep(b)]
        if after is not None:
            ids = [b.id for b in ordered]
            ordered = ordered[ids.index(after) + 1 :] if after in ids else []
        return ordered[:limit], len(ordered) > limit

    def _draw(self) -> Outcome:
        mix = self.config.batch_errors
        if not mix:
            return "ok"
        draw = self._rng.random()
        for kind in BATCH_ERROR_KINDS:
            draw -= mix.get(kind, 0.0)
            if draw < 0:
                return kind
        return "ok"

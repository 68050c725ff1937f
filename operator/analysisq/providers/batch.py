"""Provider Batch APIs: what a batch client promises, and the one for a target.

A ``BatchClient`` submits many prompts as one provider batch, finds a batch it may have
created before a crash (``find``), polls it, cancels it and streams its results.
``analysisq.providers.make_batch_client`` builds it over the target's sync provider: the
same shared httpx client, the same request builder (``payload``) and the same answer parser
(``parse``), so a batch answer and a sync answer for one prompt are the same
``Completion``. Each API is one module (``openai_batch``, ``anthropic_batch``).

Results are ``BatchResult`` per request: a ``Completion``, a typed ``ProviderError`` (the
retry policy decides, exactly as for a sync answer), ``unspent`` (expired or cancelled: the
item goes back without an attempt) or ``problem`` (a line that cannot be read: logged, and
the item stays unanswered, so it goes back unspent when the batch is ingested).

A batch object that lacks a field the driver needs (``status``, the result file of an ended
batch...) raises ``MalformedBatch`` naming the provider, the batch and the field; one that
lacks only ``request_counts`` (shown, never needed to ingest) is polled on and its state
names the field in ``missing``.

``custom_id`` is ``<item id>-<claim token hex>``: the item and its claim, within Anthropic's
``^[a-zA-Z0-9_-]{1,64}$``; results are matched to the claims still held by that string.
"""

from __future__ import annotations

import tempfile
import uuid
from array import array
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import IO, Any, Literal, Protocol

import httpx

from analysisq.completion import Completion
from analysisq.errors import PermanentError, ProviderError, TransientError
from analysisq.providers.client import Reply, decode_json, dig, send
from analysisq.spec import Target

#: ``open``: still running; ``ended``: results can be read; ``failed``: refused as a whole
#: (``failure`` says why: a ``RateLimited`` is back-pressure, anything else a bad batch).
BatchPhase = Literal["open", "ended", "failed"]


@dataclass(frozen=True)
class BatchEntry:
    """One prompt to send, under its item's claim."""

    custom_id: str
    prompt: str


@dataclass(frozen=True)
class BatchState:
    """A provider batch as last polled."""

    provider_id: str
    phase: BatchPhase
    #: The provider's own status word (``in_progress``, ``expired``, ``ended``...).
    status: str
    #: The provider's request counts, as it names them.
    counts: Mapping[str, int] = field(default_factory=dict)
    failure: ProviderError | None = None
    #: Where an ended batch's results are: file ids (OpenAI), the results URL (Anthropic).
    outputs: tuple[str, ...] = ()
    #: Fields the batch object lacked that polling and ingesting can do without.
    missing: tuple[str, ...] = ()


class MalformedBatch(TransientError):
    """The provider's batch object lacks a field the driver needs, or holds a value it does
    not know. ``final``: waiting cannot help (an ended batch without its results file)."""

    def __init__(
        self, provider: str, batch_id: str, where: str, field: str, problem: str, *, final: bool
    ) -> None:
        super().__init__(
            f"the {provider} batch {batch_id} (from {where}) is malformed: {field} {problem}"
        )
        self.provider = provider
        self.batch_id = batch_id
        self.field = field
        self.final = final


def request_counts(body: dict[str, Any]) -> tuple[dict[str, int], tuple[str, ...]]:
    """A batch object's ``request_counts``, and ``("request_counts",)`` if it has none."""
    counts = body.get("request_counts")
    if not isinstance(counts, dict):
        return {}, ("request_counts",)
    return {k: v for k, v in counts.items() if isinstance(v, int)}, ()


@dataclass(frozen=True)
class BatchResult:
    """The result of one request of a batch (see the module docstring)."""

    custom_id: str | None
    completion: Completion | None = None
    error: ProviderError | None = None
    unspent: bool = False
    problem: str | None = None


class BatchClient(Protocol):
    """One target's Batch API over the shared client."""

    @property
    def target(self) -> Target: ...

    def spool(self) -> BatchInput:
        """An empty input of one batch, in this API's format: the entries are written to it
        one by one (its ``encode`` says how many bytes each adds, for ``batch.maxBytes``)."""
        ...

    @property
    def max_input_bytes(self) -> int:
        """The most entry bytes one batch may hold at this API, whatever ``batch.maxBytes``
        says: more and the provider refuses the batch."""
        ...

    async def submit(self, body: BatchInput, metadata: Mapping[str, str]) -> str:
        """Create one provider batch of the entries written to *body* (``spool``); its id.
        Raises ``ProviderError``."""
        ...

    async def find(
        self, metadata: Mapping[str, str], *, since: datetime, count: int, known: set[str]
    ) -> str | None:
        """The id of a batch this submission created before a crash, if any: OpenAI by
        ``metadata``; Anthropic by listing batches created since *since* holding *count*
        requests that no other submission owns (not in *known*)."""
        ...

    async def poll(self, provider_id: str) -> BatchState: ...

    async def cancel(self, provider_id: str) -> None:
        """Ask the provider to cancel (a batch that already ended is not an error)."""
        ...

    def results(self, state: BatchState) -> AsyncIterator[BatchResult]:
        """Every result of an ended batch, streamed."""
        ...


class _Sync(Protocol):
    """What a Batch API client needs of its sync provider."""

    @property
    def target(self) -> Target: ...

    def headers(self) -> dict[str, str]: ...


class BatchHttp:
    """What both Batch API clients share: the key's headers and secrets, the target's
    timeout, and one JSON call over the shared client (``client.send``)."""

    def __init__(self, sync: _Sync, client: httpx.AsyncClient, api_key: str | None) -> None:
        self._sync = sync
        self._client = client
        self._secrets = (api_key or "",)
        self._timeout = sync.target.timeout_seconds

    @property
    def target(self) -> Target:
        return self._sync.target

    async def _call(
        self, method: str, url: str, *, headers: Mapping[str, str] | None = None, **content: Any
    ) -> tuple[Reply, Any]:
        """*method* *url*; the reply and its JSON object body, or a ``ProviderError``."""
        reply = await send(
            self._client,
            method,
            url,
            headers={**self._sync.headers(), **(headers or {})},
            timeout_s=self._timeout,
            secrets=self._secrets,
            **content,
        )
        return reply, dig(reply, decode_json(reply), expect=dict)

    async def _cancel(self, url: str) -> None:
        try:
            await self._call("POST", url)
        except PermanentError as exc:
            if exc.status != 400:  # 400: it ended already, which is what we wanted
                raise


#: A batch's input is spooled to disk past this size, then streamed from there: a 200 MB
#: file (OpenAI) or a 256 MB body (Anthropic) is never held whole in memory.
SPOOL_BYTES = 8 * 2**20
#: Entries are written to the spool this many bytes at a time: one call (and, on disk, one
#: system call) for many entries, not one for each.
WRITE_BYTES = 256 * 2**10


class BatchInput:
    """One batch's input as it is written, entry by entry, to a spool (on disk past
    ``SPOOL_BYTES``), neither held as objects nor as bytes. An API gives ``encode`` (the bytes
    an entry adds: the entry and the separator after it), the bytes before and after the
    entries, and how many bytes of the last separator to drop. ``cut`` keeps the first
    entries only (what a run's budget covers); ``finish``, once, ends it for the upload."""

    def __init__(
        self,
        encode: Callable[[BatchEntry], bytes],
        *,
        head: bytes = b"",
        tail: bytes = b"",
        drop_last: int = 0,
    ) -> None:
        self.encode = encode
        self._tail = tail
        self._drop_last = drop_last
        # Closed by __exit__: a BatchInput is used as a context manager.
        self._spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)  # noqa: SIM115
        self._spool.write(head)
        #: Where each entry ends (the first: where the head ends), 8 bytes an entry.
        self._ends = array("q", [len(head)])
        #: Entries not yet in the spool, fewer than ``WRITE_BYTES`` bytes of them.
        self._pending: list[bytes] = []
        self._pending_bytes = 0

    def __enter__(self) -> BatchInput:
        return self

    def __exit__(self, *exc: object) -> None:
        self._spool.close()

    @property
    def count(self) -> int:
        return len(self._ends) - 1

    @property
    def size(self) -> int:
        """Bytes the entries written take (separators included): what ``batch.maxBytes``
        and the API's ceiling (``max_input_bytes``) bound."""
        return self._ends[-1] - self._ends[0]

    def write(self, data: bytes) -> None:
        """Append one entry's bytes (``encode``)."""
        self._pending.append(data)
        self._pending_bytes += len(data)
        self._ends.append(self._ends[-1] + len(data))
        if self._pending_bytes >= WRITE_BYTES:
            self._flush()

    def _flush(self) -> None:
        self._spool.write(b"".join(self._pending))
        self._pending.clear()
        self._pending_bytes = 0

    def cut(self, n: int) -> None:
        """Keep the first *n* entries only."""
        self._flush()
        if n < self.count:
            del self._ends[n + 1 :]
            self._spool.truncate(self._ends[-1])
            self._spool.seek(self._ends[-1])

    def finish(self) -> tuple[IO[bytes], int]:
        """The whole input, positioned at its start, and its size in bytes."""
        self._flush()
        end = self._ends[-1] - (self._drop_last if self.count else 0)
        self._spool.truncate(end)
        self._spool.seek(end)
        self._spool.write(self._tail)
        size = self._spool.tell()
        self._spool.seek(0)
        return self._spool, size


async def file_chunks(file: IO[bytes], size: int = 2**20) -> AsyncIterator[bytes]:
    """*file* from where it stands, in chunks of *size* bytes: a request body httpx streams."""
    while chunk := file.read(size):
        yield chunk


def custom_id(item_id: int, token: uuid.UUID) -> str:
    return f"{item_id}-{token.hex}"

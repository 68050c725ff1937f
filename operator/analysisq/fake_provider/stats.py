"""What the fake provider saw: requests per prompt, statuses, and peak request rates.

Tests and benchmarks read these to prove queue properties from the outside: a prompt
answered more than once is a duplicate; the peak count of requests in any sliding 1- and
10-second window shows whether the workers' aggregate rate limit held, and the peak of the
tokens the answers reported in any 10- and 60-second window whether a tokens/minute limit
did. Memory stays bounded: the sliding windows keep only the events inside the window, the
per-second histogram
keeps the last day, and per-prompt counters cost about 200 bytes per distinct prompt.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass
from typing import Any

#: Seconds of per-second request counts kept for ``histogram()``.
HISTOGRAM_SECONDS = 86_400


def prompt_key(prompt: str) -> bytes:
    """The per-prompt counters' key: sha256 of the last user message."""
    return hashlib.sha256(prompt.encode()).digest()


@dataclass(frozen=True)
class PromptCounts:
    """Requests the server received for one prompt, and how many it answered with 200."""

    requests: int = 0
    completions: int = 0


@dataclass(frozen=True)
class FakeStats:
    """A snapshot of the counters since start or the last reset; ``GET /stats`` as JSON."""

    #: Every request to the chat completions route.
    requests: int
    #: Responses by HTTP status (``"hang"`` for requests that were never answered).
    by_status: dict[str, int]
    #: Successful chat completions (200 with a valid body).
    completions: int
    #: Distinct prompts seen, and those answered successfully at least once.
    prompts: int
    prompts_completed: int
    #: Prompts answered successfully more than once: duplicates.
    prompts_completed_more_than_once: int
    max_requests_per_prompt: int
    max_completions_per_prompt: int
    #: Peak number of requests (and of completions) in any sliding 1 s and 10 s window.
    max_requests_1s: int
    max_requests_10s: int
    max_completions_1s: int
    max_completions_10s: int
    #: Seconds between the first and the last request.
    elapsed_s: float
    #: Tokens the answers reported (``usage``), and their peak in any 10 s and 60 s window.
    tokens: int = 0
    max_tokens_10s: int = 0
    max_tokens_60s: int = 0
    #: Wall-clock time (Unix seconds) of the first request, ``None`` before one.
    first_request_at: float | None = None
    #: Batches created through either Batch API (paid work), and the requests they held.
    batches_created: int = 0
    batch_requests: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class _SlidingPeak:
    """The largest number of events inside any window of *window_s* seconds."""

    __slots__ = ("_times", "peak", "window_s")

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._times: deque[float] = deque()
        self.peak = 0

    def add(self, t: float) -> None:
        times = self._times
        times.append(t)
        while t - times[0] >= self.window_s:
            times.popleft()
        self.peak = max(self.peak, len(times))


class _SlidingSum:
    """The largest sum of weights of events inside any window of *window_s* seconds."""

    __slots__ = ("_events", "_sum", "peak", "window_s")

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._events: deque[tuple[float, int]] = deque()
        self._sum = 0
        self.peak = 0

    def add(self, t: float, weight: int) -> None:
        events = self._events
        events.append((t, weight))
        self._sum += weight
        while t - events[0][0] >= self.window_s:
            self._sum -= events.popleft()[1]
        self.peak = max(self.peak, self._sum)


class _Counts:
    __slots__ = ("admitted", "completions", "requests")

    def __init__(self) -> None:
        self.requests = 0
        self.admitted = 0
        self.completions = 0


class Recorder:
    """Mutable counters of one server; the app calls it, ``snapshot()`` reads it."""

    def __init__(self) -> None:
        self._prompts: dict[bytes, _Counts] = {}
        self._by_status: Counter[str] = Counter()
        self._requests = 0
        self._completions = 0
        self._first: float | None = None
        self._last = 0.0
        self._request_peaks = (_SlidingPeak(1.0), _SlidingPeak(10.0))
        self._completion_peaks = (_SlidingPeak(1.0), _SlidingPeak(10.0))
        self._per_second: deque[list[int]] = deque(maxlen=HISTOGRAM_SECONDS)
        self._tokens = 0
        self._token_peaks = (_SlidingSum(10.0), _SlidingSum(60.0))
        self._first_wall: float | None = None
        self._batches = 0
        self._batch_requests = 0

    def request(self, t: float) -> None:
        """A request arrived at monotonic time *t* (before it is even parsed)."""
        self._requests += 1
        if self._first is None:
            self._first = t
            self._first_wall = time.time()
        self._last = t
        for peak in self._request_peaks:
            peak.add(t)
        second = int(t - self._first)
        if self._per_second and self._per_second[-1][0] == second:
            self._per_second[-1][1] += 1
        else:
            self._per_second.append([second, 1])

    def batch_created(self, requests: int) -> None:
        """A batch of *requests* was accepted (its prompts are counted one by one)."""
        self._batches += 1
        self._batch_requests += requests

    def prompt(self, key: bytes) -> None:
        self._counts(key).requests += 1

    def admitted(self, key: bytes) -> int:
        """The prompt passed the key check and the rate cap; returns how often it has now."""
        counts = self._counts(key)
        counts.admitted += 1
        return counts.admitted

    def completed(self, key: bytes, t: float, tokens: int = 0) -> None:
        self._counts(key).completions += 1
        self._completions += 1
        for peak in self._completion_peaks:
            peak.add(t)
        self._tokens += tokens
        for window in self._token_peaks:
            window.add(t, tokens)

    def responded(self, status: int | str) -> None:
        self._by_status[str(status)] += 1

    def counts(self, key: bytes) -> PromptCounts:
        c = self._prompts.get(key)
        return PromptCounts(c.requests, c.completions) if c else PromptCounts()

    def histogram(self) -> list[tuple[int, int]]:
        """Requests per second since the first request: ``(second, count)``, gaps omitted."""
        return [(s, n) for s, n in self._per_second]

    def snapshot(self) -> FakeStats:
        counts = self._prompts.values()
        return FakeStats(
            requests=self._requests,
            by_status=dict(sorted(self._by_status.items())),
            completions=self._completions,
            prompts=len(self._prompts),
            prompts_completed=sum(1 for c in counts if c.completions),
            prompts_completed_more_than_once=sum(1 for c in counts if c.completions > 1),
            max_requests_per_prompt=max((c.requests for c in counts), default=0),
            max_completions_per_prompt=max((c.completions for c in counts), default=0),
            max_requests_1s=self._request_peaks[0].peak,
            max_requests_10s=self._request_peaks[1].peak,
            max_completions_1s=self._completion_peaks[0].peak,
            max_completions_10s=self._completion_peaks[1].peak,
            elapsed_s=round(self._last - self._first, 3) if self._first is not None else 0.0,
            tokens=self._tokens,
            max_tokens_10s=self._token_peaks[0].peak,
            max_tokens_60s=self._token_peaks[1].peak,
            first_request_at=self._first_wall,
            batches_created=self._batches,
            batch_requests=self._batch_requests,
        )

    def _counts(self, key: bytes) -> _Counts:
        counts = self._prompts.get(key)
        if counts is None:
            counts = self._prompts[key] = _Counts()
        return counts

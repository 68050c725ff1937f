"""What the fake provider does: latency, injected faults, its own rate cap, the API key.

One validated ``FakeConfig`` drives the server (``app``); ``POST /config`` swaps it at run
time (a chaos test can start an error storm mid-run). The CLI flags of
``analysisq fake-provider`` map one to one onto these fields (``cli_options``).
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: Faults the error mix can inject: an HTTP status with an OpenAI-shaped error body,
#: ``malformed`` (200 with a truncated JSON body) or ``hang`` (no answer for ``hang_s``).
ErrorKind = Literal["400", "401", "429", "500", "503", "malformed", "hang"]
ERROR_KINDS: tuple[ErrorKind, ...] = ("400", "401", "429", "500", "503", "malformed", "hang")
#: Per-request errors inside a batch: the status a request's result carries.
BatchErrorKind = Literal["400", "429", "500"]
BATCH_ERROR_KINDS: tuple[BatchErrorKind, ...] = ("400", "429", "500")


class FakeConfig(BaseModel):
    """Behaviour of the fake OpenAI-compatible provider. Defaults: instant, flawless."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Model name reported when a request names none (otherwise the request's is echoed).
    model: str = "fake-model"
    #: Mean added latency per admitted request, in milliseconds.
    latency_ms: float = Field(default=0.0, ge=0, le=600_000)
    #: Uniform jitter: latency is drawn from ``latency_ms ± jitter_ms`` (never below 0).
    jitter_ms: float = Field(default=0.0, ge=0, le=600_000)
    #: When set, latency is lognormal with mean ``latency_ms`` and this shape (sigma of the
    #: underlying normal; 0.5 gives a realistic long tail) and ``jitter_ms`` is ignored.
    lognormal_sigma: float | None = Field(default=None, gt=0, le=5)
    #: Probability of each injected fault per admitted request; they must sum to at most 1.
    errors: dict[ErrorKind, Annotated[float, Field(ge=0, le=1)]] = Field(default_factory=dict)
    #: ``Retry-After`` seconds sent with injected 429s.
    retry_after_s: float = Field(default=1.0, ge=0, le=3600)
    #: How long an injected ``hang`` holds the request before giving up with 504.
    hang_s: float = Field(default=600.0, ge=0, le=86_400)
    #: Each distinct prompt fails its first N admitted requests with ``fail_first_status``.
    fail_first: int = Field(default=0, ge=0, le=1000)
    #: Status of ``fail_first`` failures: a transient one.
    fail_first_status: Literal[500, 502, 503, 504] = 503
    #: When set, requests without this key (``Authorization: Bearer`` or ``x-api-key``) get 401.
    require_api_key: str | None = Field(default=None, min_length=1, repr=False)
    #: The server's own rate cap in requests per second (429 with Retry-After above it).
    rate_limit_rps: float | None = Field(default=None, gt=0, le=1_000_000)
    #: Burst the cap allows; default ``max(1, rate_limit_rps / 10)``, so that no window of
    #: one second or more admits more than the cap + 10% (+1 below 10 req/s).
    rate_limit_burst: float | None = Field(default=None, ge=1)
    #: When set, the only models served: a request naming another one gets
    #: ``unknown_model_status`` (a misspelt model name, as real gateways answer it).
    known_models: list[str] | None = Field(default=None, max_length=100)
    #: 404: OpenAI's ``model_not_found``; 400: LiteLLM's "Invalid model name".
    unknown_model_status: Literal[404, 400] = 404
    #: Prompts longer than this many characters get OpenAI's 400 ``context_length_exceeded``.
    max_prompt_chars: int | None = Field(default=None, ge=1)
    #: When set, the answer's ``usage`` reports this factor times (prompt tokens + the
    #: request's ``max_tokens``, 256 without): as if every answer used its whole ceiling and
    #: the provider's tokenizer counted F times the four-characters rule. Tests of token
    #: accounting use it to make usage differ from analysisq's estimate.
    usage_factor: float | None = Field(default=None, gt=0, le=100)
    #: Batch APIs: seconds from create to ``completed`` (OpenAI) / ``ended`` (Anthropic); the
    #: first tenth validates, the next 70% processes requests in order, the rest finalizes.
    batch_seconds: float = Field(default=2.0, ge=0, le=172_800)
    #: Probability of each per-request error inside a batch (results with that status).
    batch_errors: dict[BatchErrorKind, Annotated[float, Field(ge=0, le=1)]] = Field(
        default_factory=dict
    )
    #: The first N batches created expire at their end with about half their requests
    #: answered (the rest ``batch_expired`` / ``expired``).
    batch_expire_first: int = Field(default=0, ge=0, le=1000)
    #: The first N batches created (after the expiring ones) are refused for the enqueued-token
    #: limit: OpenAI ``failed`` with ``token_limit_exceeded``, Anthropic 429 at create.
    batch_fail_first: int = Field(default=0, ge=0, le=1000)
    #: Retrieving a batch this many seconds after its create answers 404 (eventual consistency).
    batch_not_found_s: float = Field(default=0.0, ge=0, le=3600)
    #: Chaos tests: a batch create waits this long before the batch exists (a client that
    #: hangs up meanwhile created nothing), and this long after it exists before the answer
    #: (a client that dies meanwhile never learns the id it paid for).
    batch_delay_before_create_s: float = Field(default=0.0, ge=0, le=3600)
    batch_delay_after_create_s: float = Field(default=0.0, ge=0, le=3600)
    #: Bad provider output: every result file also holds a line that is not JSON, a result
    #: for a ``custom_id`` no request had, and a second copy of its first result.
    batch_corrupt_results: bool = False
    #: Bad provider output: these fields are left out of every batch object served (e.g.
    #: ``status``, ``output_file_id``, ``request_counts``; Anthropic ``processing_status``,
    #: ``results_url``), as a broken gateway or a changed API would.
    #: Big result files: every result line carries this many bytes of padding (in a field
    #: clients ignore), so a 2,000-request batch gives a 200 MB+ file.
    batch_result_padding_bytes: int = Field(default=0, ge=0, le=10_000_000)
    batch_drop_fields: list[str] = Field(default_factory=list, max_length=20)
    #: Appended to the message of every error answer, written as the content of a JSON string
    #: so that it can say what a broken gateway sends: ``\ud83d`` is half an emoji (a lone
    #: UTF-16 surrogate), as when a body is cut mid-character.
    error_message_suffix: str = Field(default="", max_length=1000)
    #: Seed of the random draws (latency, error mix); ``None`` for a fresh one each start.
    seed: int | None = 0

    @property
    def error_suffix_text(self) -> str:
        """``error_message_suffix`` decoded (lone surrogates included)."""
        return str(json.loads(f'"{self.error_message_suffix}"'))

    @model_validator(mode="after")
    def _suffix_is_json_string_content(self) -> FakeConfig:
        try:
            self.error_suffix_text  # noqa: B018 (validates)
        except ValueError:
            raise ValueError(
                "error_message_suffix must be the content of a JSON string, e.g. \\ud83d"
            ) from None
        return self

    @model_validator(mode="after")
    def _rates_sum_to_at_most_one(self) -> FakeConfig:
        if sum(self.errors.values()) > 1 + 1e-9:
            raise ValueError("error rates must sum to at most 1")
        if sum(self.batch_errors.values()) > 1 + 1e-9:
            raise ValueError("batch error rates must sum to at most 1")
        return self

    @property
    def burst(self) -> float:
        """Token-bucket capacity of the rate cap."""
        if self.rate_limit_burst is not None:
            return self.rate_limit_burst
        return max(1.0, (self.rate_limit_rps or 0) / 10)

"""Token estimates: the one place that says how many tokens a request may cost.

It sits below both ``analysisq.queue`` (which reserves the estimate) and
``analysisq.providers`` (which sends the ceiling), so neither layer imports the other.

The rate limiter reserves a request's tokens before it is sent (``tokensPerMinute``), and a
budget reserves its tokens and cost; both use ``estimate``. The answer's usage then replaces
the estimate (``analysisq.queue.quota.settle``). The estimate is prompt tokens (about four
characters a token) plus the completion's ceiling: ``max_tokens`` (or OpenAI's
``max_completion_tokens``) when the target sets it, else what the provider itself would use
(Anthropic's API requires ``max_tokens`` and we send 1024; OpenAI-compatible APIs have no
ceiling, so 256 stands in and the answer's usage corrects it).
"""

from __future__ import annotations

from dataclasses import dataclass

from analysisq.spec import Target

#: The ``max_tokens`` the Anthropic provider sends when the target sets none (its API
#: requires one); stated here so the estimate and the request cannot disagree.
ANTHROPIC_MAX_TOKENS = 1024

#: Completion tokens assumed when the provider has no ceiling of its own and the target sets
#: none (OpenAI-compatible, plain HTTP, echo).
DEFAULT_COMPLETION_TOKENS = 256

_PROVIDER_MAX_TOKENS = {"anthropic": ANTHROPIC_MAX_TOKENS}
_MAX_TOKENS_PARAMS = ("max_tokens", "max_completion_tokens", "maxTokens")


def approx_tokens(text: str) -> int:
    """About four characters a token: the usual rule of thumb for English text."""
    return max(1, (len(text) + 3) // 4)


def completion_ceiling(target: Target) -> int:
    """The most completion tokens a request of *target* is expected to produce."""
    for name in _MAX_TOKENS_PARAMS:
        value = target.params.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return _PROVIDER_MAX_TOKENS.get(target.provider, DEFAULT_COMPLETION_TOKENS)


@dataclass(frozen=True)
class TokenEstimate:
    """Tokens reserved for one request before it is sent."""

    input: int
    output: int

    @property
    def total(self) -> int:
        return self.input + self.output


def estimate(target: Target, prompt: str) -> TokenEstimate:
    """What sending *prompt* to *target* may cost, in tokens."""
    return TokenEstimate(approx_tokens(prompt), completion_ceiling(target))

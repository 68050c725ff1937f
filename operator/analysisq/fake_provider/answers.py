"""The fake provider's answers: the same content for a prompt whichever API asked.

``chat_completion`` is OpenAI's ``chat.completion`` object and ``anthropic_message`` is
Anthropic's ``message`` object for one request body; both carry ``answer_text``, a
deterministic, analysis-shaped JSON document derived from the prompt alone, so a test can
check an answer without knowing which route (sync or batch) produced it. ``app`` and the
batch routes (``openai_batches``, ``anthropic_batches``) call these.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from analysisq.tokens import approx_tokens

_SENTIMENTS = ("positive", "neutral", "negative")


def last_user_message(body: Any) -> str | None:
    """The text of the last user message; list-of-parts content is joined."""
    messages = body.get("messages") if isinstance(body, dict) else None
    if not isinstance(messages, list):
        return None
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                texts = [p.get("text") for p in content if isinstance(p, dict)]
                content = "".join(t for t in texts if isinstance(t, str))
            return content if isinstance(content, str) and content else None
    return None


def answer_text(prompt: str, key: bytes) -> str:
    """A deterministic, analysis-shaped JSON answer derived from the prompt alone."""
    words = len(prompt.split())
    answer = {
        "summary": f"A prompt of {words} words and {len(prompt)} characters.",
        "sentiment": _SENTIMENTS[key[0] % len(_SENTIMENTS)],
        "score": round(key[1] / 255, 3),
        "prompt_sha256": key.hex(),
    }
    return json.dumps(answer)


def prompt_tokens(body: dict[str, Any]) -> int:
    """Tokens of every string message (and Anthropic's ``system``) of a request body."""
    texts = [
        m["content"]
        for m in body.get("messages", ())
        if isinstance(m, dict) and isinstance(m.get("content"), str)
    ]
    if isinstance(body.get("system"), str):
        texts.append(body["system"])
    return sum(approx_tokens(t) for t in texts)


def chat_completion(body: dict[str, Any], prompt: str, key: bytes, model: str) -> dict[str, Any]:
    """OpenAI's ``chat.completion`` for *body*; *model* when the body names none."""
    content = answer_text(prompt, key)
    tokens_in, tokens_out = prompt_tokens(body), approx_tokens(content)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": str(body.get("model") or model),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": tokens_in,
            "completion_tokens": tokens_out,
            "total_tokens": tokens_in + tokens_out,
        },
        "system_fingerprint": "fp_analysisq_fake",
    }


def anthropic_message(params: dict[str, Any], prompt: str, key: bytes) -> dict[str, Any]:
    """Anthropic's ``message`` object answering *params* (a Messages API request body)."""
    content = answer_text(prompt, key)
    return {
        "id": f"msg_{uuid.uuid4().hex[:24]}",
        "type": "message",
        "role": "assistant",
        "model": str(params.get("model")),
        "content": [{"type": "text", "text": content}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": prompt_tokens(params), "output_tokens": approx_tokens(content)},
    }

"""A batch request encoded with the prompt escaped on its bytes is byte for byte what
``json.dumps`` gives, for every kind of prompt and through both Batch API clients."""

from __future__ import annotations

import json
import random
from typing import Any

import httpx
import pytest

from analysisq.providers import make_batch_client
from analysisq.providers.anthropic_batch import AnthropicBatchClient
from analysisq.providers.batch import BatchEntry
from analysisq.providers.batch_json import json_string, request_json
from analysisq.providers.openai_batch import OpenAIBatchClient
from analysisq.spec import parse_spec

pytestmark = pytest.mark.unit

#: Every escape JSON has, non-ASCII of each UTF-8 length, and the marker's own character.
ALPHABET = 'ab "\\/\n\r\t\b\f\x00\x01\x1f\x7f é€😀\u2028'
TRICKY = [
    "plain prompt",
    'quotes " and \\ backslashes \\"',
    "lines\nand\r\ntabs\t",
    "a bell \x07 and a form feed \f",
    "\x00",
    "\\u0000",
    '"\\u0000"',
    "unicode é € 😀 \u2028 \u2029",
    "x" * 10_000,
]


def prompts() -> list[str]:
    rng = random.Random(11)
    made = ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 40))) for _ in range(2000)]
    return TRICKY + made


def test_a_json_string_is_what_json_dumps_gives() -> None:
    for text in prompts():
        assert json_string(text) == json.dumps(text, ensure_ascii=False).encode(), text


@pytest.mark.parametrize("separators", [None, (",", ":")])
def test_a_request_is_what_json_dumps_gives(separators: tuple[str, str] | None) -> None:
    for text in prompts():
        body: dict[str, Any] = {
            "model": "m",
            "temperature": 0,
            "messages": [{"role": "user", "content": text}],
        }
        record = {"custom_id": "1-ab", "method": "POST", "body": body}
        expected = json.dumps(record, ensure_ascii=False, separators=separators).encode()
        assert request_json(record, body, text, separators=separators) == expected, text
        assert body["messages"][-1]["content"] is text  # the builder's dict is left as it was


def test_a_record_that_holds_the_marker_elsewhere_is_dumped_whole() -> None:
    """A parameter that is the marker's character itself: the splice would be ambiguous."""
    body = {"stop": "\x00", "messages": [{"role": "user", "content": "hi"}]}
    record = {"custom_id": "1-ab", "body": body}
    assert request_json(record, body, "hi") == json.dumps(record, ensure_ascii=False).encode()
    other = {"messages": [{"role": "user", "content": "a copy, not the prompt"}]}
    assert request_json({"b": other}, other, "hi") == json.dumps({"b": other}).encode()


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_each_client_writes_what_json_dumps_of_its_request_gives(provider: str) -> None:
    spec = parse_spec(
        {"targets": [{"name": "t", "provider": provider, "model": "m", "mode": "batch",
                      "endpoint": "http://127.0.0.1:9", "params": {"temperature": 0.2}}]}
    )  # fmt: skip
    async with httpx.AsyncClient() as http:
        client = make_batch_client(spec.targets[0], http, None)
        with client.spool() as body:
            for text in [t for t in prompts()[:300] if t.strip()]:  # the builder refuses blanks
                entry = BatchEntry("7-0123abcd", text)
                if isinstance(client, OpenAIBatchClient):
                    record = {"custom_id": entry.custom_id, "method": "POST",
                              "url": "/v1/chat/completions",
                              "body": client.provider.payload(text)}  # fmt: skip
                    expected = json.dumps(record, ensure_ascii=False).encode() + b"\n"
                else:
                    assert isinstance(client, AnthropicBatchClient)
                    record = {"custom_id": entry.custom_id, "params": client.provider.payload(text)}
                    compact = json.dumps(record, ensure_ascii=False, separators=(",", ":"))
                    expected = compact.encode() + b","
                assert body.encode(entry) == expected, text

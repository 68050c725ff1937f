"""The retry-failed annotation: its filter grammar, and the status of a run that reopens."""

from __future__ import annotations

import pytest

from analysisq.errors import ConfigError
from analysisq.kube.retries import RetryRequest, last_retry, parse_retry_request, reopened
from analysisq.kube.status import get_condition, set_condition
from analysisq.spec import parse_spec

SPEC = parse_spec({"targets": [{"name": "gpt", "provider": "echo", "model": "m"}], "workers": 4})


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("", RetryRequest()),
        (" all ", RetryRequest()),
        ("class=permanent", RetryRequest(error_class="permanent")),
        ("target=gpt, error=Invalid model name", RetryRequest(None, "gpt", "Invalid model name")),
        ("error=x=y", RetryRequest(error="x=y")),
    ],
)
def test_filters(value: str, expected: RetryRequest) -> None:
    assert parse_retry_request(value, SPEC) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("permanent", "'permanent' is not one of class=C, target=T, error=TEXT"),
        ("klass=permanent", "'klass=permanent' is not one of"),
        ("class=permament", "unknown class 'permament'; one of: transient, rate_limited"),
        ("target=claude", "unknown target 'claude'"),
        ("class=auth,class=poison", "class is given twice"),
        ("error=", "'error=' is not one of"),
    ],
)
def test_bad_filters_say_what_is_wrong(value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_retry_request(value, SPEC)


def test_a_finished_run_reopens() -> None:
    done = set_condition([], "Complete", True, "Succeeded", "10 items: 10 completed")
    status = {"phase": "Failed", "finishedAt": "2026-12-01T02:00:00Z", "conditions": done,
              "workers": {"desired": 0, "ready": 0}}  # fmt: skip
    new = reopened(status, SPEC, 7, 4)
    assert (new["phase"], new["finishedAt"], new["workers"]) == (
        "Running", None, {"desired": 4, "ready": 0}
    )  # fmt: skip
    complete = get_condition(new, "Complete")
    assert complete is not None and complete["status"] == "False"
    assert complete["reason"] == "ItemsRetried" and "7 failed items" in complete["message"]
    suspended = parse_spec({**SPEC.to_json(), "suspend": True})
    assert reopened(status, suspended, 1, 0)["phase"] == "Suspended"
    assert last_retry(RetryRequest(target="gpt"), 7)["filter"] == "target=gpt"

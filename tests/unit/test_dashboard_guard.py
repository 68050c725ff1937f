"""The dashboard's access rules without a server: host names, and the operator's default of
read-only unless its Secret gives a token."""

from __future__ import annotations

import pytest

from analysisq.dashboard.errors import BadParameter
from analysisq.dashboard.guard import Guard
from analysisq.kube.dashboard import context_for, run_ref
from analysisq.settings import Settings

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("127.0.0.1:8765", True),
        ("localhost:1234", True),
        ("[::1]:8765", True),
        ("LOCALHOST", True),
        ("dash.example.com", True),
        ("evil.example:8765", False),
        ("127.0.0.1.evil.example", False),
        ("", False),
        (None, False),
    ],
)
def test_host_names(host: str | None, allowed: bool) -> None:
    guard = Guard.create(allowed_hosts=["Dash.Example.com"], allow_actions=True)
    assert guard.host_allowed(host) is allowed


def test_each_process_has_its_own_csrf_token() -> None:
    a, b = Guard.create(allow_actions=True), Guard.create(allow_actions=True)
    assert a.csrf_token != b.csrf_token and len(a.csrf_token) >= 32


def test_the_operator_dashboard_is_read_only_without_a_token() -> None:
    settings = Settings(database_url="postgresql://u:secret@db/x", dashboard_port=8765)
    ctx = context_for(settings, kube=None)  # type: ignore[arg-type]
    assert ctx.actions_json() == {"enabled": False, "token_required": False, "available": []}
    with_token = Settings(
        database_url="postgresql://u:secret@db/x",
        dashboard_port=8765,
        dashboard_action_token="0123456789abcdef",
        dashboard_allowed_hosts="a.example, b.example",
    )
    ctx = context_for(with_token, kube=None)  # type: ignore[arg-type]
    assert ctx.actions_json()["token_required"] is True
    assert ctx.guard.host_allowed("b.example") and not ctx.guard.host_allowed("c.example")
    assert "0123456789abcdef" not in repr(with_token)


def test_cluster_run_ids_map_to_their_analysisrun() -> None:
    ref = run_ref("team/nightly/0d1e")
    assert (ref.namespace, ref.name, ref.uid) == ("team", "nightly", "0d1e")
    with pytest.raises(BadParameter, match="not created by an AnalysisRun"):
        run_ref("local-run-1")

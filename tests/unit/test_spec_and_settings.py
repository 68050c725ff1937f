"""The shared spec model and the settings: defaults, and errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from analysisq.errors import ConfigError, SpecError, redact
from analysisq.settings import load_settings
from analysisq.spec import load_spec_file, parse_spec

pytestmark = pytest.mark.unit

ECHO = {"name": "echo", "provider": "echo", "model": "m"}


def test_defaults_are_the_seeds() -> None:
    s = parse_spec({"targets": [ECHO]})
    assert (s.workers, s.batch_size, s.max_attempts) == (20, 5, 3)
    assert s.to_json()["batchSize"] == 5  # CRD spelling on the wire


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({}, "targets: Field required"),
        ({"targets": []}, "targets: List should have at least 1 item"),
        ({"targets": [ECHO], "workers": -1}, "workers: Input should be greater than or equal"),
        ({"targets": [ECHO], "batchSize": 0}, "batchSize: Input should be greater than or equal"),
        ({"targets": [{**ECHO, "provider": "bard"}]}, "targets.0.provider: Input should be"),
        ({"targets": [ECHO, ECHO]}, "target names must be unique; repeated: echo"),
        ({"targets": [{**ECHO, "name": "Bad_Name"}]}, "must be a DNS label"),
        ({"targets": [{**ECHO, "provider": "http"}]}, "provider 'http' needs an endpoint"),
        ({"targets": [ECHO], "surprise": 1}, "surprise: Extra inputs are not permitted"),
        (
            {"targets": [{**ECHO, "apiKeySecretRef": {"name": "s"}}]},
            "targets.0.apiKeySecretRef.key: Field required",
        ),
    ],
)
def test_invalid_specs_name_the_field(data: object, message: str) -> None:
    with pytest.raises(SpecError) as exc:
        parse_spec(data)
    assert message in str(exc.value)


def test_spec_file_accepts_a_whole_manifest(tmp_path: Path) -> None:
    f = tmp_path / "run.yaml"
    f.write_text(
        "apiVersion: analysisq.io/v1alpha1\nkind: AnalysisRun\nmetadata: {name: x}\n"
        "spec:\n  workers: 3\n  targets:\n  - {name: echo, provider: echo, model: m}\n"
    )
    assert load_spec_file(f).workers == 3
    f.write_text("targets: [\n")
    with pytest.raises(SpecError, match="cannot read"):
        load_spec_file(f)


def test_settings_from_env_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://u:p@h/db")
    monkeypatch.setenv("ANALYSISQ_POLL_SECONDS", "2")
    s = load_settings()
    assert s.database_url == "postgresql://u:p@h/db" and s.poll_seconds == 2
    monkeypatch.setenv("ANALYSISQ_POLL_SECONDS", "-1")
    with pytest.raises(ConfigError, match="POLL_SECONDS"):
        load_settings()


@pytest.mark.parametrize(
    ("text", "leaked"),
    [
        ("Authorization: Bearer sk-abc123def456ghi", "sk-abc123def456ghi"),
        ('{"api_key": "hunter2hunter2"}', "hunter2hunter2"),
        ("connecting to postgresql://app:s3cr3t@db:5432/x", "s3cr3t"),
        ("x-api-key=ant-secret-value", "ant-secret-value"),
        ("GET https://user:hunter2@api.example.com/v1 failed", "hunter2"),
        ("postgresql://app:p@ss@db:5432/x", "p@ss"),
    ],
)
def test_redact_removes_credentials(text: str, leaked: str) -> None:
    out = redact(text)
    assert leaked not in out
    assert "***" in out


def test_redact_replaces_nul_which_postgresql_text_refuses() -> None:
    assert "\x00" not in redact("bad\x00byte")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("unit", ["a.", "a-", "x+1."])
def test_redact_is_linear_on_garbage(unit: str) -> None:
    """Scheme-like garbage made the URL-credential pattern quadratic: 32 KB took 6 s on the
    event loop. A megabyte of it (hours, before) must be nothing now; the timeout is the
    check, with a margin of a thousand."""
    body = unit * (1_000_000 // len(unit))
    out = redact(body + " https://user:hunter2@api.example.com/", 2000)
    assert len(out) == 2000 and out.endswith("…")
    assert redact(body[:300] + "GET https://u:hunter2@h/ x", 10_000).endswith("https://***@h/ x")
    assert "hunter2" not in redact(body[:1999] + "://u:hunter2@h/", 2000)


def test_redact_masks_a_credential_that_the_cut_goes_through() -> None:
    text = "x" * 290 + " Authorization: Bearer sk-abcdefghijklmnopqrstuvwxyz0123456789"
    out = redact(text, 300)
    assert len(out) == 300 and "sk-abc" not in out and "abcdefg" not in out


@pytest.mark.parametrize(
    "exc",
    [
        "CrashShutdownError",
        "AdminShutdownError",
        "CannotConnectNowError",
        "QueryCanceledError",
        "ReadOnlySQLTransactionError",
    ],
)
def test_server_restarts_and_failovers_are_unavailable_not_bugs(exc: str) -> None:
    import asyncpg

    from analysisq.db.connect import translated
    from analysisq.errors import DatabaseUnavailable

    with pytest.raises(DatabaseUnavailable), translated("testing"):
        raise getattr(asyncpg, exc)("server says no")


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_batch_mode_for_providers_with_a_batch_api(provider: str) -> None:
    target = {"name": "a", "provider": provider, "model": "m", "mode": "batch"}
    spec = parse_spec({"targets": [target]})
    assert spec.targets[0].mode == "batch" and spec.targets[0].batch.max_requests == 50_000
    assert parse_spec({"targets": [{**target, "mode": "sync"}]}).targets[0].mode == "sync"
    assert spec.to_json()["targets"][0]["mode"] == "batch"


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ({"provider": "echo"}, "targets.0: .*mode 'batch' needs a provider with a Batch API"),
        ({"provider": "http", "endpoint": "http://x"}, "provider 'http' has none"),
        ({"provider": "openai", "batch": {"maxRequests": 60_000}}, "at most 50000"),
        ({"provider": "anthropic", "batch": {"maxRequests": 200_000}}, "maxRequests"),
        ({"provider": "openai", "mode": "async"}, "targets.0.mode: Input should be 'sync'"),
    ],
)
def test_batch_mode_refused_clearly(target: dict[str, object], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        parse_spec({"targets": [{"name": "a", "model": "m", "mode": "batch", **target}]})

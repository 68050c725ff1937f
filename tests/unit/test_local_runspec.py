"""A local run's spec from flags and YAML, the ``--target`` short form, and the progress
arithmetic (``analysisq.local.runspec``, ``analysisq.local.progress``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console

from analysisq.errors import SpecError
from analysisq.local.progress import Snapshot, line, render
from analysisq.local.runspec import build_spec, parse_target
from analysisq.queue.states import Counts

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("flag", "target"),
    [
        ("gpt=openai:gpt-4o-mini", {"name": "gpt", "provider": "openai", "model": "gpt-4o-mini"}),
        (
            "openai:gpt-4o-mini@http://127.0.0.1:8000/v1",
            {"name": "gpt-4o-mini", "provider": "openai", "model": "gpt-4o-mini",
             "endpoint": "http://127.0.0.1:8000/v1"},
        ),
        (
            "claude=anthropic:claude-3@20240229",
            {"name": "claude", "provider": "anthropic", "model": "claude-3@20240229"},
        ),
        ("e=echo:Echo_1", {"name": "e", "provider": "echo", "model": "Echo_1"}),
    ],
)  # fmt: skip
def test_parse_target(flag: str, target: dict[str, str]) -> None:
    assert parse_target(flag) == target


@pytest.mark.parametrize("flag", ["gpt=vertex:gemini", "gpt", "gpt=openai:", "=openai:m x"])
def test_parse_target_refuses(flag: str) -> None:
    with pytest.raises(SpecError, match="NAME=PROVIDER:MODEL"):
        parse_target(flag)


def test_flags_override_the_yaml_and_apply_to_every_target(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(
        "apiVersion: analysisq.io/v1alpha1\nkind: AnalysisRun\nmetadata: {name: daily}\n"
        "spec:\n  workers: 7\n  batchSize: 9\n  prompts: {tags: [brand]}\n  targets:\n"
        "    - {name: a, provider: echo, model: m, rateLimit: {tokensPerMinute: 1000}}\n"
        "    - {name: b, provider: openai, model: gpt-4o-mini}\n"
    )
    spec = build_spec(
        path, [], requests_per_second=5, timeout_seconds=3, api_key_env="KEY", batch_size=2,
        workers=None,
    )  # fmt: skip
    assert (spec.workers, spec.batch_size, spec.prompts.tags) == (7, 2, ["brand"])
    a, b = spec.targets
    assert a.rate_limit is not None and b.rate_limit is not None
    assert (a.rate_limit.requests_per_second, a.rate_limit.tokens_per_minute) == (5, 1000)
    assert (b.rate_limit.requests_per_second, b.timeout_seconds, b.api_key_env) == (5, 3, "KEY")

    only_flags = build_spec(path, ["x=echo:m"], tags=["t"])
    assert [t.name for t in only_flags.targets] == ["x"] and only_flags.prompts.tags == ["t"]


def test_spec_errors_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="no target"):
        build_spec(None, [])
    with pytest.raises(SpecError, match="batchSize"):
        build_spec(None, ["e=echo:m"], batch_size=0)
    path = tmp_path / "run.yaml"
    path.write_text("- a list\n")
    with pytest.raises(SpecError, match="expected a mapping"):
        build_spec(path, [])


def test_eta() -> None:
    snap = Snapshot("r", Counts(total=200, completed=140, failed_for_good=10), elapsed=30, rate=5.0)
    assert snap.eta == pytest.approx(10.0)
    assert Snapshot("r", Counts(total=3, completed=3), elapsed=1).eta == 0.0
    assert Snapshot("r", Counts(total=3), elapsed=1).eta is None


def test_progress_renders_counts_errors_and_pauses() -> None:
    snap = Snapshot(
        "local-1",
        Counts(total=100, pending=50, processing=5, completed=40, failed_for_good=2, retrying=3),
        elapsed=65,
        rate=2.5,
        errors={"transient": 3, "auth": 1},
        paused={"gpt": "HTTP 401: invalid key"},
        workers_alive=3,
        workers=4,
        restarts=1,
    )
    text = line(snap)
    assert "42/100 done (42.0%)" in text and "retrying=3" in text
    assert "eta=0:00:23" in text and "errors=transient:3,auth:1" in text and "paused=gpt" in text
    console = Console(width=100, record=True)
    console.print(render(snap))
    panel = console.export_text()
    assert "target gpt PAUSED: HTTP 401: invalid key" in panel
    assert "workers 3/4 (1 restarted)" in panel

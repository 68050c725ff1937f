"""The daily trigger's rules: names, dates, durations, the template and which runs to prune."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path

import pytest
from click.testing import CliRunner

from analysisq.cli.main import cli
from analysisq.errors import ConfigError, SpecError
from analysisq.kube.trigger import (
    DATE_ANNOTATION,
    TRIGGER_LABEL,
    RunInfo,
    name_date,
    run_manifest,
    run_name,
    runs_to_prune,
    template_spec,
    today_utc,
)
from analysisq.settings import TriggerSettings, check_prefix, parse_day, parse_duration

pytestmark = pytest.mark.unit

T0 = datetime(2025, 3, 1, 2, 0, tzinfo=UTC)


def run(name: str, phase: str | None = "Succeeded", created: datetime = T0) -> RunInfo:
    return RunInfo(name=name, phase=phase, created=created)


# --- names and dates ------------------------------------------------------------------------


def test_run_name_is_prefix_and_utc_day() -> None:
    assert run_name("daily", date(2025, 1, 31)) == "daily-20250131"
    assert run_name("team-a", date(2025, 12, 1)) == "team-a-20251201"


@pytest.mark.parametrize("prefix", ["", "Daily", "-daily", "daily-", "dai_ly", "a" * 55])
def test_bad_prefixes_are_refused(prefix: str) -> None:
    with pytest.raises(ConfigError):
        check_prefix(prefix)


def test_longest_prefix_makes_a_63_character_name() -> None:
    assert len(run_name("a" * 54, date(2025, 1, 1))) == 63


def test_today_is_the_utc_date() -> None:
    # 23:30 in UTC-5 on Jan 31 is already Feb 1 in UTC.
    late = datetime(2025, 1, 31, 23, 30, tzinfo=timezone(timedelta(hours=-5)))
    assert today_utc(late) == date(2025, 2, 1)
    assert today_utc(datetime(2025, 2, 1, 0, 0, 1, tzinfo=UTC)) == date(2025, 2, 1)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("daily-20250131", date(2025, 1, 31)),
        ("daily-20250230", None),  # no such day
        ("daily-2025013", None),
        ("daily-x-20250131", None),  # another prefix's run
        ("nightly-20250131", None),
        ("daily", None),
    ],
)
def test_name_date(name: str, expected: date | None) -> None:
    assert name_date("daily", name) == expected


def test_name_date_of_a_prefix_with_dashes() -> None:
    assert name_date("team-a", "team-a-20250131") == date(2025, 1, 31)
    assert name_date("team", "team-a-20250131") is None


def test_parse_day() -> None:
    assert parse_day("2025-01-31") == date(2025, 1, 31)
    for bad in ["2025-1-31", "20250131", "2025-02-30", "yesterday", ""]:
        with pytest.raises(ConfigError, match="YYYY-MM-DD"):
            parse_day(bad)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("6h", timedelta(hours=6)),
        ("90m", timedelta(minutes=90)),
        ("1d12h", timedelta(days=1, hours=12)),
        ("45s", timedelta(seconds=45)),
        ("1h30m", timedelta(hours=1, minutes=30)),
    ],
)
def test_parse_duration(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "0h", "6", "h", "6x", "-1h", "30m1h"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_duration(text)


# --- the template ---------------------------------------------------------------------------

SPEC = "targets:\n  - {name: echo, provider: echo, model: echo-1}\nworkers: 3\n"


def test_template_is_a_bare_spec_or_a_manifest() -> None:
    assert template_spec(SPEC, source="t")["workers"] == 3
    manifest = "apiVersion: analysisq.io/v1alpha1\nkind: AnalysisRun\nspec:\n  " + SPEC.replace(
        "\n", "\n  "
    )
    assert template_spec(manifest, source="t")["workers"] == 3


def test_template_keeps_the_spec_as_written() -> None:
    # The API server applies the CRD defaults; the trigger does not bake in its own.
    assert template_spec(SPEC, source="t") == {
        "targets": [{"name": "echo", "provider": "echo", "model": "echo-1"}],
        "workers": 3,
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("targets: [", "not valid YAML"),
        ("- a\n- b\n", "YAML mapping"),
        ("workers: 3\n", "targets"),
        ("targets: []\n", "targets"),
        ("targets:\n  - {name: x, provider: nope, model: m}\n", "provider"),
        (SPEC + "batchSize: 0\n", "batchSize"),
        (SPEC + "unknownField: 1\n", "unknownField"),
    ],
)
def test_invalid_templates_are_refused_with_the_field(text: str, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        template_spec(text, source="the run template")


def test_manifest_labels_and_deadline() -> None:
    body = run_manifest(
        name="daily-20250301",
        namespace="ns",
        prefix="daily",
        day=date(2025, 3, 1),
        spec={"targets": [], "deadline": "2020-01-01T00:00:00Z"},
        deadline=T0 + timedelta(hours=6),
    )
    assert body["metadata"]["labels"][TRIGGER_LABEL] == "daily"
    assert body["metadata"]["annotations"][DATE_ANNOTATION] == "2025-03-01"
    assert body["spec"]["deadline"] == "2025-03-01T08:00:00Z"
    assert body["kind"] == "AnalysisRun"


def test_manifest_keeps_the_template_deadline_without_override() -> None:
    spec = {"targets": [], "deadline": "2030-01-01T00:00:00Z"}
    body = run_manifest(name="d-1", namespace="n", prefix="d", day=date(2030, 1, 1), spec=spec)
    assert body["spec"]["deadline"] == "2030-01-01T00:00:00Z"


# --- pruning --------------------------------------------------------------------------------


def names(runs: list[RunInfo]) -> list[str]:
    return [r.name for r in runs]


def test_prunes_finished_runs_beyond_keep_oldest_last() -> None:
    runs = [run(f"daily-202501{d:02d}") for d in range(1, 8)]
    assert names(runs_to_prune("daily", runs, 3)) == [
        "daily-20250104",
        "daily-20250103",
        "daily-20250102",
        "daily-20250101",
    ]


def test_unfinished_runs_are_never_pruned_and_do_not_count() -> None:
    runs = [
        run("daily-20250101", phase="Running"),  # old but still running: kept
        run("daily-20250102", phase="Failed"),
        run("daily-20250103", phase="Succeeded"),
        run("daily-20250104", phase="Suspended"),
        run("daily-20250105", phase=None),  # just created, no status yet
        run("daily-20250106", phase="Succeeded"),
    ]
    assert names(runs_to_prune("daily", runs, 2)) == ["daily-20250102"]


def test_the_date_in_the_name_beats_creation_time() -> None:
    # A backfill made today for Jan 1 is older than yesterday's run.
    runs = [
        run("daily-20250101", created=T0 + timedelta(days=30)),
        run("daily-20250215", created=T0),
    ]
    assert names(runs_to_prune("daily", runs, 1)) == ["daily-20250101"]


def test_names_without_a_date_fall_back_to_creation_time() -> None:
    runs = [
        run("daily-manual", created=datetime(2025, 1, 10, tzinfo=UTC)),
        run("daily-20250105"),
        run("daily-20250120"),
    ]
    assert names(runs_to_prune("daily", runs, 1)) == ["daily-manual", "daily-20250105"]


def test_keep_zero_prunes_every_finished_run_and_keep_large_none() -> None:
    runs = [run("daily-20250101"), run("daily-20250102", phase="Running")]
    assert names(runs_to_prune("daily", runs, 0)) == ["daily-20250101"]
    assert runs_to_prune("daily", runs, 10) == []
    with pytest.raises(ConfigError):
        runs_to_prune("daily", runs, -1)


def test_run_info_from_an_api_object() -> None:
    info = RunInfo.from_body(
        {
            "metadata": {
                "name": "daily-20250101",
                "uid": "u-1",
                "resourceVersion": "42",
                "creationTimestamp": "2025-01-01T02:00:03Z",
            },
            "status": {"phase": "Failed"},
        }
    )
    assert info.finished
    assert info.created == datetime(2025, 1, 1, 2, 0, 3, tzinfo=UTC)
    assert (info.uid, info.resource_version) == ("u-1", "42")
    assert not RunInfo.from_body({"metadata": {"name": "x"}}).finished


# --- the command ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--date", "2025-02-30"], "YYYY-MM-DD"),
        (["--prefix", "Daily"], "invalid run name prefix"),
        (["--deadline-in", "soon"], "invalid duration"),
    ],
)
def test_command_refuses_bad_flags_before_touching_the_cluster(
    args: list[str], message: str
) -> None:
    result = CliRunner().invoke(
        cli, ["trigger", "--namespace", "ns", "--template-configmap", "t", *args]
    )
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_command_without_a_cluster_says_so(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing-kubeconfig"))
    result = CliRunner().invoke(cli, ["trigger", "--namespace", "ns", "--template-configmap", "t"])
    assert result.exit_code == 2, result.output
    assert "no Kubernetes configuration" in result.output


def test_options_from_the_environment_are_validated_and_named(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The chart sets ANALYSISQ_TRIGGER_*: a bad value names its variable, as settings do.
    monkeypatch.setenv("ANALYSISQ_TRIGGER_TEMPLATE_CONFIGMAP", "t")
    monkeypatch.setenv("ANALYSISQ_TRIGGER_DATE", "2025-02-30")
    result = CliRunner().invoke(cli, ["trigger", "--namespace", "ns"])
    assert result.exit_code == 2, result.output
    assert "ANALYSISQ_TRIGGER_DATE" in result.output
    assert "YYYY-MM-DD" in result.output


def test_the_template_configmap_is_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ANALYSISQ_TRIGGER_TEMPLATE_CONFIGMAP", raising=False)
    result = CliRunner().invoke(cli, ["trigger", "--namespace", "ns"])
    assert result.exit_code == 2, result.output
    assert "ANALYSISQ_TRIGGER_TEMPLATE_CONFIGMAP (--template-configmap)" in result.output


def test_the_chart_sets_only_variables_the_trigger_reads() -> None:
    # A misspelt variable in the CronJob would be ignored silently; every one it sets is a
    # TriggerSettings field.
    template = Path(__file__).parents[2] / "charts/analysisq/templates/trigger-cronjob.yaml"
    names = set(re.findall(r"ANALYSISQ_TRIGGER_(\w+)", template.read_text()))
    assert names, "the CronJob sets no ANALYSISQ_TRIGGER_* variable"
    assert {n.lower() for n in names} <= set(TriggerSettings.model_fields)

"""The flags of ``analysisq fake-provider``, one per ``FakeConfig`` field, for the CLI.

The command in ``analysisq.cli`` is expected to read::

    @main.command("fake-provider")
    @fake_provider_options
    def fake_provider(host: str, port: int, **options: Any) -> None:
        asyncio.run(serve(config_from_options(options), host, port))

Flags left out keep the value from ``--config`` (a YAML or JSON ``FakeConfig``), else the
default. The required API key is read from ``ANALYSISQ_FAKE_PROVIDER_API_KEY`` too, so that
it need not appear on a command line.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import click
import yaml
from pydantic import ValidationError

from analysisq.errors import ConfigError
from analysisq.fake_provider.config import BATCH_ERROR_KINDS, ERROR_KINDS, FakeConfig

F = TypeVar("F", bound=Callable[..., Any])

_FLOAT = click.FloatRange(min=0)
_OPTIONS = (
    click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind."),
    click.option("--port", default=8000, show_default=True, type=int, help="Port to bind."),
    click.option(
        "--config",
        "config_file",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="A FakeConfig as YAML or JSON; flags override it.",
    ),
    click.option("--model", help="Model name reported when a request names none."),
    click.option("--latency-ms", type=_FLOAT, help="Mean added latency per request."),
    click.option("--jitter-ms", type=_FLOAT, help="Uniform jitter around --latency-ms."),
    click.option("--lognormal-sigma", type=_FLOAT, help="Lognormal latency with this sigma."),
    click.option(
        "--error",
        "errors",
        multiple=True,
        metavar="KIND=P",
        help=f"Inject a fault with probability P; KIND is one of {', '.join(ERROR_KINDS)}. "
        "Repeatable.",
    ),
    click.option("--retry-after-s", type=_FLOAT, help="Retry-After of injected 429s."),
    click.option("--hang-s", type=_FLOAT, help="How long an injected hang lasts."),
    click.option("--fail-first", type=click.IntRange(min=0), help="Fail each prompt N times."),
    click.option(
        "--fail-first-status",
        type=click.Choice(["500", "502", "503", "504"]),
        help="Status of --fail-first failures.",
    ),
    click.option(
        "--require-api-key",
        envvar="ANALYSISQ_FAKE_PROVIDER_API_KEY",
        help="Answer 401 unless requests carry this key.",
    ),
    click.option("--rate-limit-rps", type=float, help="Own rate cap: 429 above R req/s."),
    click.option("--rate-limit-burst", type=float, help="Burst allowed by the rate cap."),
    click.option(
        "--known-model",
        "known_models",
        multiple=True,
        help="Serve only this model (repeatable); others get --unknown-model-status.",
    ),
    click.option(
        "--unknown-model-status",
        type=click.Choice(["404", "400"]),
        help="404 model_not_found (OpenAI) or 400 Invalid model name (LiteLLM).",
    ),
    click.option("--max-prompt-chars", type=int, help="400 context_length_exceeded above."),
    click.option(
        "--usage-factor",
        type=_FLOAT,
        help="Report usage as F x (prompt tokens + the request's max_tokens).",
    ),
    click.option(
        "--batch-seconds", type=_FLOAT, help="Batch APIs: seconds from create to the end."
    ),
    click.option(
        "--batch-error",
        "batch_errors",
        multiple=True,
        metavar="KIND=P",
        help=f"Per-request error inside batches with probability P; KIND is one of "
        f"{', '.join(BATCH_ERROR_KINDS)}. Repeatable.",
    ),
    click.option(
        "--batch-expire-first",
        type=click.IntRange(min=0),
        help="The first N batches expire with about half their requests answered.",
    ),
    click.option(
        "--batch-fail-first",
        type=click.IntRange(min=0),
        help="The first N batches are refused: token_limit_exceeded (OpenAI), 429 (Anthropic).",
    ),
    click.option(
        "--batch-not-found-s",
        type=_FLOAT,
        help="A batch answers 404 for this many seconds after its create.",
    ),
    click.option(
        "--batch-delay-before-create-s",
        type=_FLOAT,
        help="Hold a batch create this long before the batch exists (chaos tests).",
    ),
    click.option(
        "--batch-delay-after-create-s",
        type=_FLOAT,
        help="Hold a batch create this long after the batch exists (chaos tests).",
    ),
    click.option(
        "--batch-corrupt-results/--no-batch-corrupt-results",
        default=None,
        help="Add a non-JSON line, an unknown custom_id and a repeated result to result files.",
    ),
    click.option(
        "--batch-result-padding-bytes",
        type=click.IntRange(min=0),
        help="Pad every batch result line with N bytes (big result files).",
    ),
    click.option(
        "--batch-drop-field",
        "batch_drop_fields",
        multiple=True,
        metavar="FIELD",
        help="Leave FIELD out of every batch object (e.g. status, output_file_id). Repeatable.",
    ),
    click.option(
        "--error-message-suffix", help="Appended to every error message (e.g. half an emoji)."
    ),
    click.option("--seed", type=int, help="Seed of the random draws."),
)


def fake_provider_options(command: F) -> F:
    """Add every flag of ``analysisq fake-provider`` to *command*."""
    for option in reversed(_OPTIONS):
        command = option(command)
    return command


def config_from_options(options: Mapping[str, Any]) -> FakeConfig:
    """The ``FakeConfig`` the flags describe (``host`` and ``port`` are ignored)."""
    data: dict[str, Any] = {}
    config_file = options.get("config_file")
    if config_file is not None:
        try:
            loaded = yaml.safe_load(Path(config_file).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read {config_file}: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{config_file} must hold a mapping of FakeConfig fields")
        data.update(loaded)
    for name, value in options.items():
        skip = ("host", "port", "config_file", "errors", "batch_errors")
        if name in skip or value is None or value == ():
            continue
        if name in ("fail_first_status", "unknown_model_status"):
            value = int(value)
        data[name] = list(value) if name in ("known_models", "batch_drop_fields") else value
    for name in ("errors", "batch_errors"):
        if options.get(name):
            flag = "--error" if name == "errors" else "--batch-error"
            data[name] = {**data.get(name, {}), **_error_mix(options[name], flag)}
    try:
        return FakeConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(f"invalid fake provider options: {problems}") from None


def _error_mix(pairs: tuple[str, ...], flag: str) -> dict[str, float]:
    mix: dict[str, float] = {}
    for pair in pairs:
        kind, sep, rate = pair.partition("=")
        try:
            mix[kind.strip()] = float(rate)
        except ValueError:
            sep = ""
        if not sep:
            raise ConfigError(f"{flag} {pair!r}: expected KIND=PROBABILITY, e.g. 500=0.1")
    return mix

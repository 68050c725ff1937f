"""Tokens, cost and budget as people and scripts read them: ``analysisq status``, ``runs``
and the summary of ``analysisq run`` share these lines."""

from __future__ import annotations

from typing import Any

from analysisq.queue.usage import RunUsage, format_cost


def usage_json(used: RunUsage) -> dict[str, Any]:
    """The run's tokens and cost, in total and per target (cost ``None`` without pricing)."""
    return {
        "tokens_in": used.tokens_in,
        "tokens_out": used.tokens_out,
        "cost": used.cost,
        "targets": [vars(t) for t in used.targets],
    }


def usage_lines(used: dict[str, Any], budget: dict[str, Any] | None) -> list[str]:
    """``Tokens: ...`` per target and in total, then the budget, from ``usage_json``."""
    lines = []
    for t in used["targets"]:
        lines.append(
            f"target {t['target']}: {t['answers']:,} answers, {t['tokens_in']:,} tokens in, "
            f"{t['tokens_out']:,} out, cost {format_cost(t['cost'])} (pool {t['pool']})"
        )
    lines.append(
        f"Tokens: {used['tokens_in']:,} in, {used['tokens_out']:,} out; "
        f"cost {format_cost(used['cost'])}."
    )
    if budget is not None:
        limits = []
        if budget["max_cost"] is not None:
            limits.append(f"cost {budget['spent_cost']:.4g} of {budget['max_cost']:g}")
        if budget["max_tokens"] is not None:
            limits.append(f"{budget['spent_tokens']:,} of {budget['max_tokens']:,} tokens")
        state = "EXHAUSTED (the run is paused)" if budget["exhausted"] else "open"
        lines.append(f"Budget {state}: spent {', '.join(limits)}.")
    return lines

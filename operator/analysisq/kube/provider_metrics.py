"""Provider metrics per run and target, derived from the database by the operator.

Why from the database and not from a port on every worker: the queue and the results
already hold each fact (one result per successful call with its latency and tokens, the
class of each item's last error, the 429 deferrals), so the numbers are exact across worker
restarts and scale-downs (a killed worker pod takes its counters with it), cost nothing in
the worker's hot path, need no PodMonitor reaching every worker pod, and read the same for a
run drained by ``analysisq run``. The price is one pass over the run's items and one over its
results (``queue.dashboard.provider_calls``), at most every ``provider_metrics_seconds`` per
run (a setting, 60 s by default), and
that what the database does not keep cannot be exported: the class of an error that a later
attempt overcame.

Series (labels ``namespace``, ``run``, ``target``):

- ``analysisq_provider_items{outcome}``: items by the outcome of their latest provider call
  (``ok`` or an error class: transient, rate_limited, permanent, auth, ...);
- ``analysisq_provider_rate_limited_total``: 429 answers and deferrals (no attempt burnt);
- ``analysisq_provider_latency_seconds``: histogram of successful calls;
- ``analysisq_target_paused``: 1 while the target is paused (auth failure, budget, ...).

``Metrics`` (``kube.metrics``) registers this collector; ``RunService.reconcile`` feeds it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from analysisq.kube.ref import RunRef
from analysisq.queue.dashboard import TargetCalls

#: Latency bucket bounds in seconds: LLM calls take from a few hundred ms to minutes.
LATENCY_BOUNDS: tuple[float, ...] = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

#: Every metric name this collector exports (the Grafana test cross-checks its queries).
NAMES = (
    "analysisq_provider_items",
    "analysisq_provider_rate_limited_total",
    "analysisq_provider_latency_seconds",
    "analysisq_target_paused",
)


class ProviderCollector(Collector):
    """Holds the latest snapshot per run; renders it at scrape time (no query on scrape)."""

    def __init__(
        self, refresh_seconds: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        #: seconds between two reads of a run's calls (paused targets: every reconcile)
        self.refresh_seconds = refresh_seconds
        self._calls: dict[tuple[str, str], Mapping[str, TargetCalls]] = {}
        self._paused: dict[tuple[str, str], Mapping[str, bool]] = {}
        self._read_at: dict[tuple[str, str], float] = {}
        self._clock = clock

    def due(self, ref: RunRef) -> bool:
        """Whether the run's calls should be read again (``refresh_seconds`` passed)."""
        last = self._read_at.get((ref.namespace, ref.name))
        return last is None or self._clock() - last >= self.refresh_seconds

    def observe_calls(self, ref: RunRef, calls: Mapping[str, TargetCalls]) -> None:
        key = (ref.namespace, ref.name)
        self._calls[key] = dict(calls)
        self._read_at[key] = self._clock()

    def observe_paused(self, ref: RunRef, paused: Mapping[str, bool]) -> None:
        """*paused* maps every target of the run to whether it is paused."""
        self._paused[(ref.namespace, ref.name)] = dict(paused)

    def forget(self, ref: RunRef) -> None:
        key = (ref.namespace, ref.name)
        for held in (self._calls, self._paused, self._read_at):
            held.pop(key, None)

    def collect(self) -> Iterator[Metric]:
        labels = ["namespace", "run", "target"]
        items = GaugeMetricFamily(
            "analysisq_provider_items",
            "Items by the outcome of their latest provider call",
            labels=[*labels, "outcome"],
        )
        limited = CounterMetricFamily(
            "analysisq_provider_rate_limited",
            "Provider 429 answers and rate-limit deferrals (no attempt burnt)",
            labels=labels,
        )
        latency = HistogramMetricFamily(
            "analysisq_provider_latency_seconds",
            "Latency of successful provider calls",
            labels=labels,
        )
        paused = GaugeMetricFamily(
            "analysisq_target_paused", "1 while a target of the run is paused", labels=labels
        )
        for (namespace, run), targets in sorted(self._paused.items()):
            for target, is_paused in sorted(targets.items()):
                paused.add_metric([namespace, run, target], 1.0 if is_paused else 0.0)
        for (namespace, run), per_target in sorted(self._calls.items()):
            for target, calls in sorted(per_target.items()):
                key = [namespace, run, target]
                for outcome, n in sorted(calls.outcomes.items()):
                    items.add_metric([*key, outcome], n)
                limited.add_metric(key, calls.deferrals)
                latency.add_metric(
                    key, _buckets(LATENCY_BOUNDS, calls), sum_value=calls.latency_seconds
                )
        yield from (items, limited, latency, paused)


def _buckets(bounds: Sequence[float], calls: TargetCalls) -> list[tuple[str, float]]:
    cumulative = calls.latency_buckets or [0] * len(bounds)
    out = [(f"{b:g}", float(n)) for b, n in zip(bounds, cumulative, strict=True)]
    return [*out, ("+Inf", float(calls.latency_count))]

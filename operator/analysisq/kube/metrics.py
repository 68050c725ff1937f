"""Prometheus metrics of the operator, on their own registry (``/metrics`` on a port).

Per run (labels ``namespace``, ``run``): items by status, workers desired/ready, progress,
throughput, phase, deadline; the stuck items reset; tokens of the stored answers
(``direction`` in/out) and their cost, per target (absent without ``pricing``); per target
the provider metrics of ``kube.provider_metrics`` (derived from the database). For the
operator: reconcile errors by reason and reconcile durations. The alerts of the chart are
written against these names: stuck items for 15 minutes
(``analysisq_run_items{status="stuck"} > 0``), a failure ratio above 1 %, a run not complete
by its deadline, a stalled run, a paused target.
"""

from __future__ import annotations

import contextlib
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from analysisq.kube.provider_metrics import ProviderCollector
from analysisq.kube.ref import RunRef
from analysisq.kube.status import FINISHED, PHASES
from analysisq.queue.states import Counts

#: The status label values: the counts under their names in status (``Counts.as_dict``).
_STATUSES = tuple(Counts().as_dict())
_RUN = ("namespace", "run")


class Metrics:
    def __init__(self, provider_refresh_seconds: float = 60.0) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.items = Gauge(
            "analysisq_run_items", "Items of a run by status", [*_RUN, "status"], registry=r
        )
        self.workers = Gauge(
            "analysisq_run_workers", "Worker pods of a run", [*_RUN, "state"], registry=r
        )
        self.progress = Gauge(
            "analysisq_run_progress_ratio", "Terminal items / total items", _RUN, registry=r
        )
        self.throughput = Gauge(
            "analysisq_run_throughput_items_per_second",
            "Items finished per second, recently",
            _RUN,
            registry=r,
        )
        self.phase = Gauge(
            "analysisq_run_phase", "1 for the run's current phase", [*_RUN, "phase"], registry=r
        )
        self.deadline = Gauge(
            "analysisq_run_deadline_timestamp_seconds",
            "spec.deadline of a run (absent without one)",
            _RUN,
            registry=r,
        )
        self.tokens = Gauge(
            "analysisq_run_tokens",
            "Tokens of a run's stored answers, by target and direction (in/out)",
            [*_RUN, "target", "direction"],
            registry=r,
        )
        self.cost = Gauge(
            "analysisq_run_cost",
            "Cost of a run's stored answers at the target's pricing (absent without one)",
            [*_RUN, "target"],
            registry=r,
        )
        self.batches = Gauge(
            "analysisq_run_provider_batches",
            "Targets in mode batch: items waiting inside provider batches, and open batches",
            [*_RUN, "kind"],
            registry=r,
        )
        self.stuck_reset = Counter(
            "analysisq_stuck_items_reset_total",
            "Stuck items reset by the operator's timer",
            _RUN,
            registry=r,
        )
        self.reconcile_errors = Counter(
            "analysisq_reconcile_errors_total",
            "Reconciliations that failed, by reason",
            ["reason"],
            registry=r,
        )
        self.reconcile_seconds = Histogram(
            "analysisq_reconcile_duration_seconds",
            "Time one reconciliation of a run took",
            registry=r,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        #: Targets with token series per run, so that ``forget`` removes them all.
        self._targets: dict[tuple[str, str], set[str]] = {}
        self.providers = ProviderCollector(provider_refresh_seconds)
        r.register(self.providers)

    def observe(
        self, ref: RunRef, status: dict[str, Any], deadline: float | None, throughput: float | None
    ) -> None:
        """Set the run's gauges from its reconciled status and its measured *throughput*
        (items per second; None while it is not measured or once the run is finished)."""
        key = (ref.namespace, ref.name)
        for name, value in (status.get("counts") or {}).items():
            self.items.labels(*key, name).set(value)
        workers = status.get("workers") or {}
        for state in ("desired", "ready"):
            self.workers.labels(*key, state).set(workers.get(state, 0))
        counts = status.get("counts") or {}
        total = counts.get("total") or 0
        terminal = counts.get("completed", 0) + counts.get("failed", 0)
        self.progress.labels(*key).set(terminal / total if total else 1.0)
        self.throughput.labels(*key).set(throughput or 0.0)
        for phase in PHASES:
            self.phase.labels(*key, phase).set(1 if status.get("phase") == phase else 0)
        for t in (status.get("usage") or {}).get("targets") or []:
            self.tokens.labels(*key, t["name"], "in").set(t["tokensIn"])
            self.tokens.labels(*key, t["name"], "out").set(t["tokensOut"])
            if "cost" in t:
                self.cost.labels(*key, t["name"]).set(t["cost"])
            self._targets.setdefault(key, set()).add(t["name"])
        batches = status.get("batches")
        if batches:
            self.batches.labels(*key, "items").set(batches["items"])
            self.batches.labels(*key, "open").set(batches["openCount"])
        if deadline is not None and status.get("phase") not in FINISHED:
            self.deadline.labels(*key).set(deadline)
        else:
            self._remove(self.deadline, key)

    def forget(self, ref: RunRef) -> None:
        """Drop every series of a deleted run."""
        key = (ref.namespace, ref.name)
        for status in _STATUSES:
            self._remove(self.items, (*key, status))
        for state in ("desired", "ready"):
            self._remove(self.workers, (*key, state))
        for phase in PHASES:
            self._remove(self.phase, (*key, phase))
        for kind in ("items", "open"):
            self._remove(self.batches, (*key, kind))
        for metric in (self.progress, self.throughput, self.deadline, self.stuck_reset):
            self._remove(metric, key)
        for target in self._targets.pop(key, set()):
            for direction in ("in", "out"):
                self._remove(self.tokens, (*key, target, direction))
            self._remove(self.cost, (*key, target))
        self.providers.forget(ref)

    @staticmethod
    def _remove(metric: Any, labels: tuple[str, ...]) -> None:
        with contextlib.suppress(KeyError):
            metric.remove(*labels)

    def serve(self, port: int, host: str = "0.0.0.0") -> Any:
        """Serve ``/metrics`` from a thread; returns the server (``.shutdown()`` stops it)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server

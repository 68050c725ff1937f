"""The worker: claims a run's items, asks the providers, writes what happened.

Read in this order: ``startup.serve`` (a worker process: signals, database, schema) builds a
``loops.Worker`` (the claim and flush loops, the lease loops of ``leases``), which keeps its claims
in ``inflight`` (one record per claim: item id + claim token), runs one ``attempt`` per claim
(rate slot -> provider -> ``Completion`` or a ``Decision``), buffers answers in ``results``
(batched, fenced completion) and ends every other claim through ``settle`` (a ``Decision``
handed to ``queue.decisions.apply``, retried while the database is away).
Below the worker: ``analysisq.queue`` (SQL) and ``analysisq.providers`` (HTTP).
"""

from analysisq.worker.loops import Worker, worker_name
from analysisq.worker.settle import WorkerStats
from analysisq.worker.startup import serve

__all__ = ["Worker", "WorkerStats", "serve", "worker_name"]

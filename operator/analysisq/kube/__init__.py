"""The Kubernetes operator: ``AnalysisRun`` resources in, worker Deployments and status out.

Read it in the order a resource travels:

- ``startup`` configures kopf (storage under ``analysisq.io``, watch timeouts, standalone
  mode), checks the database schema, serves liveness and metrics, and runs the operator;
- ``handlers`` are the thin kopf handlers: they turn the body into a ``RunRef`` and the
  shared ``AnalysisRunSpec``, call the service, and write what it reports (status, events);
- ``service`` holds the rules: record and fill the run (``analysisq.queue``), keep the worker
  Deployment right, reconcile counts into status, reset stuck items, clean up on delete;
- ``deployment`` builds the worker Deployment manifest, ``status`` computes phases, conditions
  and the printer-column fields, ``ref`` names things (run id, labels, owner reference);
- ``kubeapi`` and ``databases`` are the boundaries: the Kubernetes API (errors translated to
  ``analysisq.errors``) and one asyncpg pool per database URL (schema checked once);
- ``metrics`` holds the Prometheus collectors.

The package is not called ``operator``: that would shadow the standard library module.
"""

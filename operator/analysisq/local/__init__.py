"""Local mode: ``analysisq run`` and ``analysisq demo`` on one machine, no cluster needed.

A local run drives the very same ``analysisq worker`` processes that the Kubernetes pods run.
Follow a run in this order:

- ``prompt_file`` / ``prompt_import``  validate a CSV or JSONL file and store its prompts
  (``analysisq.queue.prompts``)
- ``runspec``      the run's spec from a YAML file or from flags (one model: ``AnalysisRunSpec``)
- ``launch``       import, create and fill (or reopen) a run, then supervise it
- ``runner``       the supervisor: workers, stuck resets, progress, the end of a run
- ``workers``      start, watch, restart and stop the worker processes
- ``progress``     the live display (rich) and the plain progress lines, from
  ``analysisq.queue.monitor``'s reads
- ``export``       results to JSONL or CSV by keyset paging
- ``sample_prompts`` / ``demo``  the demo's prompts and its fake provider
"""

"""analysisq benchmarks: ``python -m bench <name>`` (``python -m bench all`` runs every one).

Each benchmark starts its own embedded PostgreSQL (fsync off, as the output says) or, when
``DATABASE_URL`` is set, creates a scratch database on that server; prints a table; and
appends one JSON line per measurement to the results file (``bench/results.jsonl`` unless
``--results`` says otherwise). ``docs/benchmarks.md`` holds the method and the figures.

These are measurements, not tests: nothing here asserts, and nothing in ``tests/`` runs them.
"""

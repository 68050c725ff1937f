"""analysisq: a Kubernetes operator and PostgreSQL work queue for daily LLM prompt analyses.

Where things live (follow one item from fill to result in this order):

- ``spec``            the AnalysisRun spec, shared by the CRD, the CLI and the database
- ``db``              connections, named SQL, migrations, the embedded PostgreSQL
- ``queue``           fill, claim, lease, complete/fail (fenced), rescue, rate limits
- ``providers``       the httpx client and one module per provider API
- ``worker``          the loop that drains a run's queue
- ``kube``            the kopf operator (handlers are thin; rules live in ``queue``)
- ``local``           ``analysisq run`` / ``demo``: the same workers as local processes
- ``cli``             the one command line, ``analysisq``
"""

__version__ = "0.1.0"

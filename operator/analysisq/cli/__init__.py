"""The one command line, ``analysisq``: every role (operator, worker, trigger, migrate) and
every local and runbook command. ``main`` holds the group and shared options; each module
adds the commands of one area."""

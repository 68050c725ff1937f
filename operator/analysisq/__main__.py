"""`python -m analysisq` is the `analysisq` command."""

from analysisq.cli.main import main

main()

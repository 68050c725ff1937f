"""Build tools for tests (helm from Go modules) and the chart helpers they share."""

"""Fixtures of the real-node tier (see controlplane.nodefixtures)."""

from controlplane.nodefixtures import pytest_terminal_summary, real_node

__all__ = ["pytest_terminal_summary", "real_node"]

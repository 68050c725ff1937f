"""A mark on a test item once one of its phases failed, for fixtures that add logs to reports."""

from __future__ import annotations

import pytest

FAILED_KEY = pytest.StashKey[bool]()

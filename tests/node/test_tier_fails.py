"""The node tier fails, never skips, when the real node cannot run: `.ci/run` (`make test`)
must not pass on a machine that never ran the image."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tools.helm import ROOT

pytestmark = [pytest.mark.node, pytest.mark.timeout(180)]


def test_the_tier_fails_when_the_node_binaries_are_missing(tmp_path: Path) -> None:
    env = {**os.environ, "ANALYSISQ_NODE_BIN": str(tmp_path / "no-such-dir")}
    test = "tests/node/test_real_node.py::test_a_run_completes_and_its_workers_scale_to_zero"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "node", "-q", "-p", "no:cacheprovider", test],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=150, check=False,
    )  # fmt: skip
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "the real node is unavailable (build): node binaries missing" in out, out
    assert "1 error" in out and "skipped" not in out, out

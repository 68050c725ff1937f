"""The project's fake provider in a process of its own, for the benchmarks.

``python -m bench.fake_server --port P --config JSON`` serves ``FakeConfig(**JSON)`` on
127.0.0.1:P until SIGTERM; its counters are at ``GET /stats``. A separate process keeps the
provider's work off the workers' event loops (and off the benchmark's).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import time
from typing import Any

import httpx

from analysisq.fake_provider import FakeConfig, serve

from .common import ROOT, child_env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class FakeServer:
    """A fake provider process: ``with FakeServer(config) as fake: fake.url, fake.stats()``."""

    def __init__(self, config: dict[str, Any], log_path: str | None = None) -> None:
        FakeConfig(**config)  # fail here, not in the child
        self.config = config
        self.port = free_port()
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def pid(self) -> int:
        assert self._proc is not None, "the fake provider is not running"
        return self._proc.pid

    def __enter__(self) -> FakeServer:
        log = open(self.log_path or "/dev/null", "ab")
        self._proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.fake_server",
                "--port",
                str(self.port),
                "--config",
                json.dumps(self.config),
            ],
            cwd=ROOT,
            env=child_env(),
            stdout=log,
            stderr=log,
        )
        log.close()
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=1).raise_for_status()
                return self
            except httpx.HTTPError:
                if time.monotonic() > deadline or self._proc.poll() is not None:
                    self.__exit__()
                    raise RuntimeError("the fake provider did not start") from None
                time.sleep(0.1)

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def stats(self, *, histogram: bool = False) -> dict[str, Any]:
        """The provider's counters (``FakeStats`` as JSON; with *histogram* also
        ``requests_per_second``: [second, requests] pairs)."""
        query = "?histogram=1" if histogram else ""
        r = httpx.get(f"http://127.0.0.1:{self.port}/stats{query}", timeout=10)
        r.raise_for_status()
        data: dict[str, Any] = r.json()
        return data


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.fake_server")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--config", default="{}", help="FakeConfig fields as JSON")
    args = p.parse_args(argv)
    asyncio.run(serve(FakeConfig(**json.loads(args.config)), "127.0.0.1", args.port))


if __name__ == "__main__":
    main()

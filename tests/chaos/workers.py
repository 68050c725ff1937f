"""Worker processes for chaos tests: the real ``analysisq worker`` command as subprocesses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import IO


class WorkerProcs:
    """Starts N ``python -m analysisq worker`` processes and always reaps them."""

    def __init__(self, db_url: str, run_id: str, log_dir: Path, **env: str) -> None:
        self.db_url = db_url
        self.run_id = run_id
        self.log_dir = log_dir
        self.env = {
            **os.environ,
            "DATABASE_URL": db_url,
            "ANALYSISQ_POLL_SECONDS": "0.1",
            "ANALYSISQ_RETRY_BASE_SECONDS": "0.1",
            "ANALYSISQ_RETRY_CAP_SECONDS": "1",
            **env,
        }
        self.procs: list[subprocess.Popen[bytes]] = []
        self._logs: list[IO[bytes]] = []

    def start(self, n: int = 1, *, exit_when_done: bool = True) -> list[subprocess.Popen[bytes]]:
        started = []
        for _ in range(n):
            log = open(self.log_dir / f"worker-{len(self.procs)}.log", "wb")  # noqa: SIM115
            cmd = [sys.executable, "-m", "analysisq", "worker", "--run", self.run_id]
            if exit_when_done:
                cmd.append("--exit-when-done")
            p = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT)
            self.procs.append(p)
            self._logs.append(log)
            started.append(p)
        return started

    def wait(self, timeout: float) -> list[int]:
        return [p.wait(timeout=timeout) for p in self.procs]

    def logs(self) -> str:
        return "\n".join(
            f"--- {f.name}\n" + Path(f.name).read_text(errors="replace")[-3000:] for f in self._logs
        )

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
            p.wait()
        for f in self._logs:
            f.close()

"""The worker processes of a local run: start, watch, restart, stop.

Each slot runs ``python -m analysisq worker --run RUN --exit-when-done`` — the very command a
worker pod runs — with ``DATABASE_URL`` in its environment and its output appended to
``worker-N.log`` in the run's directory. A worker that dies while the run still has items is
restarted (and counted); one that exits with code 2 (bad configuration, e.g. a missing API
key) would fail the same way again, so the pool reports it as fatal instead. On Linux each
worker gets SIGTERM if the supervising process dies, so no worker outlives its supervisor.

``runner`` owns one ``WorkerPool`` per run.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from analysisq.errors import AnalysisqError, ConfigError

#: A worker that exits sooner than this after starting counts as a fast failure.
FAST_FAILURE_SECONDS = 5.0
#: Consecutive fast failures of one slot after which the pool gives up.
MAX_FAST_FAILURES = 5
#: Exit code of ``analysisq`` for bad configuration or input: restarting will not help.
EXIT_CONFIG = 2
_PR_SET_PDEATHSIG = 1

if sys.platform == "linux":
    _prctl = ctypes.CDLL(None, use_errno=True).prctl

    def _die_with_parent() -> None:
        # Runs in the child between fork and exec: SIGTERM when the supervisor dies.
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)

    _PREEXEC: Callable[[], None] | None = _die_with_parent
else:  # pragma: no cover - local runs elsewhere simply lack the safety net
    _PREEXEC = None


def worker_command(run_id: str) -> list[str]:
    return [sys.executable, "-m", "analysisq", "worker", "--run", run_id, "--exit-when-done"]


class WorkerPool:
    """*count* worker processes for one run."""

    def __init__(
        self,
        run_id: str,
        count: int,
        *,
        env: dict[str, str],
        log_dir: Path,
        run_done: Callable[[], Awaitable[bool]],
        max_restarts: int,
        notify: Callable[[str], None] = lambda message: None,
    ) -> None:
        self.run_id = run_id
        self.count = count
        self.env = env
        self.log_dir = log_dir
        self.max_restarts = max_restarts
        self._run_done = run_done
        self._notify = notify
        self._procs: dict[int, asyncio.subprocess.Process] = {}
        self._slots: list[asyncio.Task[None]] = []
        self._stopping = False
        #: Unexpected exits that were restarted.
        self.restarts = 0
        #: Set when workers cannot run; raise it.
        self.fatal: AnalysisqError | None = None

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs.values() if p.returncode is None]

    @property
    def alive(self) -> int:
        return len(self.pids)

    @property
    def started(self) -> bool:
        return bool(self._slots)

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._slots = [asyncio.create_task(self._slot(i)) for i in range(self.count)]

    async def wait_exited(self, timeout: float) -> bool:
        """Wait until every slot is over (workers exit by themselves when the run is done)."""
        if not self._slots:
            return True
        _, pending = await asyncio.wait(self._slots, timeout=timeout)
        return not pending

    async def stop(self, grace: float) -> None:
        """SIGTERM every worker (they release what they hold), SIGKILL after *grace*."""
        self._stopping = True
        self._signal(signal.SIGTERM)
        if not await self.wait_exited(grace):
            self.kill()
            await self.wait_exited(10.0)
        for task in self._slots:
            task.cancel()
        await asyncio.gather(*self._slots, return_exceptions=True)

    def kill(self) -> None:
        """SIGKILL every worker now; their items come back when their leases expire."""
        self._stopping = True
        self._signal(signal.SIGKILL)

    def _signal(self, sig: signal.Signals) -> None:
        for proc in self._procs.values():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)

    async def _spawn(self, slot: int) -> asyncio.subprocess.Process:
        with (self.log_dir / f"worker-{slot}.log").open("ab") as log:
            return await asyncio.create_subprocess_exec(
                *worker_command(self.run_id),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                preexec_fn=_PREEXEC,
            )

    async def _slot(self, slot: int) -> None:
        fast_failures = 0
        while not self._stopping:
            started = time.monotonic()
            proc = self._procs[slot] = await self._spawn(slot)
            if self._stopping:  # stop() came while it was starting
                proc.send_signal(signal.SIGTERM)
            code = await proc.wait()
            if self._stopping:
                return
            if code == 0 and await self._run_done():
                return
            if code == EXIT_CONFIG:
                self.fatal = ConfigError(f"worker {slot} refused to run: {self._last_line(slot)}")
                return
            lived = time.monotonic() - started
            fast_failures = fast_failures + 1 if lived < FAST_FAILURE_SECONDS else 0
            if fast_failures >= MAX_FAST_FAILURES:
                self.fatal = AnalysisqError(
                    f"worker {slot} exited {fast_failures} times in a row right after starting; "
                    f"last: {self._last_line(slot)}"
                )
                return
            if self.restarts >= self.max_restarts:
                self.fatal = AnalysisqError(
                    f"workers died {self.restarts + 1} times; see the logs in {self.log_dir}"
                )
                return
            self.restarts += 1
            self._notify(f"worker {slot} (pid {proc.pid}) {_describe(code)}; restarting it")
            await asyncio.sleep(min(2.0**fast_failures - 1, 10.0))

    def _last_line(self, slot: int) -> str:
        path = self.log_dir / f"worker-{slot}.log"
        try:
            with path.open("rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
                lines = [ln for ln in f.read().decode("utf-8", "replace").splitlines() if ln]
        except OSError:
            return f"(see {path})"
        return f"{lines[-1][:500]} (log: {path})" if lines else f"(no output; log: {path})"


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"

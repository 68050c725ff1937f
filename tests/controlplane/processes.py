"""Child processes that never outlive the test run.

Every process the harness and the pod runner start gets its own session (so its own process
group, which a terminal's Ctrl-C does not reach) and is registered with a *reaper*: a tiny
Python process that reads group ids on its stdin and, when that pipe closes because this
process died without cleaning up (even by SIGKILL), kills every group still registered.
The normal path unregisters each group after stopping it, so the reaper then has nothing to do.
What outlives a process group (a real node's container shims, cgroups, mounts and network
namespace) is registered as a *cleanup command* that the reaper runs after the kills.
:mod:`controlplane.harness` and :mod:`controlplane.podrunner` build on :class:`Child`.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import ClassVar

log = logging.getLogger(__name__)

_REAPER_SCRIPT = """# analysisq control-plane reaper
import json, os, signal, subprocess, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
groups = set()
cleanups = {}
for line in sys.stdin:
    line = line.strip()
    if line.startswith("+"):
        groups.add(int(line[1:]))
    elif line.startswith("-"):
        groups.discard(int(line[1:]))
    elif line.startswith("!"):
        key, _, argv = line[1:].partition(" ")
        cleanups[key] = json.loads(argv)
    elif line.startswith("~"):
        cleanups.pop(line[1:], None)
for sig in (signal.SIGTERM, signal.SIGKILL):
    alive = set()
    for group in groups:
        try:
            os.killpg(group, sig)
            alive.add(group)
        except OSError:
            pass
    if not alive:
        break
    groups = alive
    time.sleep(2)
for argv in reversed(list(cleanups.values())):
    try:
        subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=120, check=False)
    except Exception:
        pass
"""


class Reaper:
    """The shared watchdog process; see the module docstring."""

    _instance: ClassVar[Reaper | None] = None
    _instance_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _REAPER_SCRIPT],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            text=True,
        )

    @classmethod
    def shared(cls) -> Reaper:
        with cls._instance_lock:
            if cls._instance is None or cls._instance._proc.poll() is not None:
                cls._instance = Reaper()
                atexit.register(cls.close_shared)
            return cls._instance

    def _send(self, line: str) -> None:
        stdin = self._proc.stdin
        assert stdin is not None
        with self._lock:
            try:
                stdin.write(line + "\n")
                stdin.flush()
            except (BrokenPipeError, ValueError):
                log.warning("the reaper process is gone; cannot register %s", line)

    def register(self, pgid: int) -> None:
        self._send(f"+{pgid}")

    def unregister(self, pgid: int) -> None:
        self._send(f"-{pgid}")

    def register_cleanup(self, key: str, argv: Sequence[str]) -> None:
        """Run ``argv`` if this process dies without calling :meth:`unregister_cleanup`;
        commands run after the process groups are killed, the last registered first."""
        self._send(f"!{key} {json.dumps(list(argv))}")

    def unregister_cleanup(self, key: str) -> None:
        self._send(f"~{key}")

    @classmethod
    def close_shared(cls) -> None:
        """Stop the reaper (groups still registered are killed by it)."""
        atexit.unregister(cls.close_shared)
        with cls._instance_lock:
            reaper, cls._instance = cls._instance, None
        if reaper is not None:
            assert reaper._proc.stdin is not None
            with contextlib.suppress(BrokenPipeError, ValueError):
                reaper._proc.stdin.close()
            try:
                reaper._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                reaper._proc.kill()
                reaper._proc.wait()


class Child:
    """One process in its own process group, logging to a file, registered with the reaper."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        reaper = Reaper.shared()
        with log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                start_new_session=True,
            )
        self.pid = self.proc.pid
        reaper.register(self.pid)
        self._reaper = reaper
        self._released = False
        self._lock = threading.Lock()

    def poll(self) -> int | None:
        """The exit code once the main process exited, else None.

        The rest of the group is killed *before* the main process is reaped: while it is a
        zombie its pid, which is also the group id, cannot be reused by another process.
        """
        with self._lock:
            if self.proc.returncode is not None:
                return self.proc.returncode
            try:
                exited = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return self.proc.poll()
            if exited is None:
                return None
            self.kill_group(signal.SIGKILL)
            return self.proc.wait()

    def alive(self) -> bool:
        return self.poll() is None

    def send_signal(self, sig: int) -> None:
        """Signal the main process only, as a container runtime does with SIGTERM."""
        with self._lock:
            if self.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, sig)

    def kill_group(self, sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the main process to exit; None if it still runs after ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() >= deadline:
                return None
            time.sleep(0.02)
        return code

    def stop(self, grace: float = 10.0, sig: int = signal.SIGTERM) -> int:
        """Send ``sig`` to the group, SIGKILL it after ``grace`` seconds; return the exit code."""
        if self.poll() is None:
            with self._lock:
                if self.proc.returncode is None:
                    self.kill_group(sig)
            if self.wait(grace) is None:
                log.warning("%s (pid %d) ignored signal %s; killing it", self.name, self.pid, sig)
        return self.release()

    def release(self) -> int:
        """Kill whatever is left of the group, reap the process and unregister it."""
        with self._lock:
            if self.proc.returncode is None:
                self.kill_group(signal.SIGKILL)
        code = self.wait()
        assert code is not None
        if not self._released:
            self._released = True
            self._reaper.unregister(self.pid)
        return code

    def log_tail(self, lines: int = 30) -> str:
        try:
            with self.log_path.open("rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 16384))
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def wait_for(
    what: str,
    check: Callable[[], bool],
    children: Iterable[Child],
    timeout: float,
    error: type[Exception],
    interval: float = 0.1,
) -> None:
    """Poll ``check()`` until true; raise ``error`` with the logs' tails when one of
    ``children`` died meanwhile or ``timeout`` seconds passed."""
    children = list(children)
    deadline = time.monotonic() + timeout
    while True:
        for child in children:
            if not child.alive():
                raise error(
                    f"{child.name} exited with code {child.poll()} while waiting for {what};"
                    f" last lines of {child.log_path}:\n{child.log_tail()}"
                )
        if check():
            return
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {c.name} ({c.log_path}):\n{c.log_tail(15)}" for c in children)
            raise error(f"timed out waiting for {what}\n{tails}")
        time.sleep(interval)


def run(
    argv: Sequence[str], *, input: str | None = None, timeout: float | None = None
) -> subprocess.CompletedProcess[str]:
    """``subprocess.run`` with captured text output, for short commands such as kubectl: the
    process gets its own group, registered with the reaper, so it dies with this process."""
    reaper = Reaper.shared()
    with subprocess.Popen(
        list(argv),
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as proc:
        reaper.register(proc.pid)
        try:
            stdout, stderr = proc.communicate(input, timeout=timeout)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        finally:
            reaper.unregister(proc.pid)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def rss_bytes(pid: int) -> int:
    """Resident set size of one process, from /proc (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0

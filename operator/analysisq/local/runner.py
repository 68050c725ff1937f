"""The supervisor of a local run: what ``analysisq run`` and ``analysisq demo`` do after the
prompts are stored.

``launch`` opens the run; ``Supervisor`` then starts the worker processes (``workers``), and
every tick reads the run's counts, shows them
(``progress``), resets stuck items every ``rescue_interval_seconds`` and decides whether the
run is over:

- every item terminal: the workers exit by themselves; the run is marked finished and its
  results are written (``export``);
- only items of paused targets are left (an auth failure, a target fault): stop rather than
  wait forever;
- the run's budget is exhausted and nothing is in flight: stop, every item kept (exit 3,
  with the ``--resume RUN --budget`` line that continues);
- SIGINT/SIGTERM: SIGTERM to the workers, which release what they hold (not counted as an
  attempt); a second signal kills them (their items return when their leases expire);
- the workers cannot run (bad configuration, crash loop): stop and say why.

How it ended is a ``RunOutcome`` (``outcome``, with the summary a person reads).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path

import asyncpg
from rich.console import Console

from analysisq.db.connect import acquire
from analysisq.errors import DatabaseTransient, InputError
from analysisq.local.export import export_results
from analysisq.local.outcome import Ending, RunOutcome
from analysisq.local.progress import Display, Snapshot
from analysisq.local.workers import WorkerPool
from analysisq.queue import batches, budget, monitor, rescue, runs, usage
from analysisq.queue.runs import Run
from analysisq.queue.throughput import LOCAL_WINDOW_SECONDS, RateMeter
from analysisq.settings import Settings

TICK_SECONDS = 0.5
#: How long finished workers get to notice the run is done and exit by themselves.
EXIT_WAIT_SECONDS = 15.0


def run_dir(settings: Settings, run_id: str) -> Path:
    """Where a local run keeps its worker logs and, by default, its results."""
    return settings.data_dir / "runs" / run_id.replace("/", "_")


def worker_env(settings: Settings, url: str) -> dict[str, str]:
    """The environment of a worker: ours, plus every setting and the database URL."""
    env = dict(os.environ)
    for name, value in settings.model_dump(exclude={"database_url"}).items():
        if value is not None:
            env[f"ANALYSISQ_{name.upper()}"] = str(value)
    env["DATABASE_URL"] = env["ANALYSISQ_DATABASE_URL"] = url
    env["ANALYSISQ_LOG_FORMAT"] = "json"
    return env


class Supervisor:
    """Runs one run's workers to an end, with live progress."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        run: Run,
        settings: Settings,
        url: str,
        *,
        workers: int,
        console: Console,
        output: Path | None = None,
        output_format: str | None = None,
        live: bool | None = None,
    ) -> None:
        if workers < 1:
            raise InputError("a local run needs at least one worker (--workers)")
        self.pool = pool
        self.run = run
        self.settings = settings
        self.output = output or run_dir(settings, run.id) / "results.jsonl"
        self.output_format = output_format
        self.display = Display(console, interval=settings.progress_interval_seconds, live=live)
        self.workers = WorkerPool(
            run.id,
            workers,
            env=worker_env(settings, url),
            log_dir=run_dir(settings, run.id),
            run_done=self._done,
            max_restarts=settings.max_worker_restarts,
            notify=self.display.note,
        )
        self._interrupted = asyncio.Event()
        self._meter = RateMeter(LOCAL_WINDOW_SECONDS)
        self._started = time.monotonic()
        self._terminal_at_start: int | None = None

    async def run_to_end(self) -> RunOutcome:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal)
        try:
            with self.display:
                try:
                    ending, snap = await self._watch()
                finally:
                    await self._stop_workers()
                snap = await self._snapshot()
                self.display.update(snap)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
        if self.workers.fatal is not None:
            raise self.workers.fatal
        outcome = RunOutcome(
            run=self.run,
            ending=ending,
            counts=snap.counts,
            elapsed=snap.elapsed,
            done_here=snap.counts.terminal - (self._terminal_at_start or 0),
            restarts=self.workers.restarts,
            paused=snap.paused,
            faulted=await self._faulted(),
        )
        if ending is Ending.FINISHED:
            await self._finish(outcome)
        with contextlib.suppress(DatabaseTransient):
            async with acquire(self.pool) as conn:
                outcome.usage = await usage.run_usage(conn, self.run.id)
                outcome.budget = await budget.state(conn, self.run.id)
                if any(t.mode == "batch" for t in self.run.spec.targets):
                    outcome.batches = await batches.summary(conn, self.run.id)
        return outcome

    def _on_signal(self) -> None:
        if self._interrupted.is_set():
            self.display.note("second interrupt: killing the workers now")
            self.workers.kill()
            return
        self._interrupted.set()
        self.display.note(
            "interrupted: stopping the workers; they release their items (not counted as "
            "attempts). Press Ctrl-C again to kill them at once."
        )

    async def _watch(self) -> tuple[Ending, Snapshot]:
        next_rescue = time.monotonic() + self.settings.rescue_interval_seconds
        while True:
            try:
                snap = await self._snapshot()
            except DatabaseTransient as exc:
                self.display.note(f"retrying: {exc.message}")
                await self._pause(TICK_SECONDS * 4)
                continue
            self.display.update(snap)
            if not self.workers.started and not snap.counts.done:
                self.workers.start()
            if self._interrupted.is_set():
                return Ending.INTERRUPTED, snap
            if self.workers.fatal is not None:  # raised once the others are stopped
                return Ending.INTERRUPTED, snap
            if snap.counts.done:
                await self.workers.wait_exited(EXIT_WAIT_SECONDS)
                return Ending.FINISHED, snap
            if snap.paused and await self._only_paused_left(snap.paused):
                return Ending.PAUSED, snap
            if snap.counts.processing == 0 and await self._budget_exhausted():
                return Ending.BUDGET, snap
            if time.monotonic() >= next_rescue:
                next_rescue = time.monotonic() + self.settings.rescue_interval_seconds
                await self._rescue()
            await self._pause(TICK_SECONDS)

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._interrupted.wait(), timeout=seconds)

    async def _snapshot(self) -> Snapshot:
        async with acquire(self.pool) as conn:
            counts = await runs.counts(conn, self.run.id)
            errors = await monitor.error_classes(conn, self.run.id)
            targets = await runs.targets(conn, self.run.id)
            in_batches = None
            if any(t.mode == "batch" for t in self.run.spec.targets):
                in_batches = await batches.summary(conn, self.run.id)
        self._meter.add(counts.terminal)
        if self._terminal_at_start is None:
            self._terminal_at_start = counts.terminal
        return Snapshot(
            run_id=self.run.id,
            counts=counts,
            elapsed=time.monotonic() - self._started,
            rate=self._meter.rate,
            errors=errors,
            paused={t.target: t.pause_reason or "" for t in targets if t.paused_at},
            workers_alive=self.workers.alive,
            workers=self.workers.count,
            restarts=self.workers.restarts,
            batches=in_batches,
        )

    async def _faulted(self) -> frozenset[str]:
        async with acquire(self.pool) as conn:
            targets = await runs.targets(conn, self.run.id)
        return frozenset(t.target for t in targets if t.paused_at and t.fault)

    async def _only_paused_left(self, paused: dict[str, str]) -> bool:
        async with acquire(self.pool) as conn:
            backlog = await monitor.target_backlog(conn, self.run.id)
        return all(b.target in paused and b.processing == 0 for b in backlog)

    async def _budget_exhausted(self) -> bool:
        if self.run.spec.budget is None:
            return False
        async with acquire(self.pool) as conn:
            state = await budget.state(conn, self.run.id)
        return state is not None and state.exhausted

    async def _rescue(self) -> None:
        try:
            async with acquire(self.pool) as conn:
                res = await rescue.rescue_stuck(
                    conn, self.run.id, self.run.spec.stuck_after_seconds
                )
        except DatabaseTransient:
            return
        if res.reset or res.poisoned:
            self.display.note(f"reset {res.reset} stuck items ({res.poisoned} failed as poison)")

    async def _done(self) -> bool:
        try:
            async with acquire(self.pool) as conn:
                return (await runs.counts(conn, self.run.id)).done
        except DatabaseTransient:
            return False

    async def _stop_workers(self) -> None:
        await self.workers.stop(grace=self.settings.shutdown_grace_seconds + 5)

    async def _finish(self, outcome: RunOutcome) -> None:
        async with acquire(self.pool) as conn:
            await runs.mark_finished(conn, self.run.id)
            outcome.retry = await monitor.retry_report(conn, self.run.id)
            outcome.results_written = await export_results(
                conn, self.run.id, self.output, self.output_format
            )
        outcome.results_path = self.output

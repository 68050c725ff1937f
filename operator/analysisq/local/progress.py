"""What a local run shows while it works: a live rich panel, or plain lines when not a tty.

``runner`` builds a ``Snapshot`` every tick from the database (counts, errors by class, paused
targets), the worker pool and the throughput (``queue.throughput.RateMeter``); ``Display``
renders it, with an ETA.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import timedelta
from types import TracebackType

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from analysisq.queue.batches import BatchSummary
from analysisq.queue.states import Counts

_STATUS_STYLES = (
    ("pending", "cyan"),
    ("processing", "yellow"),
    ("completed", "green"),
    ("retrying", "magenta"),
    ("failed", "red"),
    ("stuck", "bright_red"),
)


@dataclass(frozen=True)
class Snapshot:
    """The state of a run at one moment, as the display shows it."""

    run_id: str
    counts: Counts
    elapsed: float
    rate: float | None = None
    errors: dict[str, int] = field(default_factory=dict)
    paused: dict[str, str] = field(default_factory=dict)
    workers_alive: int = 0
    workers: int = 0
    restarts: int = 0
    #: Runs with targets in mode batch: items waiting in provider batches, open batches.
    batches: BatchSummary | None = None

    @property
    def eta(self) -> float | None:
        remaining = self.counts.total - self.counts.terminal
        if remaining == 0:
            return 0.0
        return remaining / self.rate if self.rate else None


def duration(seconds: float | None) -> str:
    return "--:--" if seconds is None else str(timedelta(seconds=round(seconds)))


def _rate(snap: Snapshot) -> str:
    return "-" if snap.rate is None else f"{snap.rate:,.1f}"


def render(snap: Snapshot) -> RenderableType:
    """The live panel."""
    c = snap.counts
    bar = Table.grid(padding=(0, 1))
    bar.add_row(
        ProgressBar(total=max(c.total, 1), completed=c.terminal, width=50),
        Text(f"{100 * c.progress:5.1f}%  {c.terminal:,} / {c.total:,}", style="bold"),
    )
    statuses = Table.grid(padding=(0, 2))
    for _ in _STATUS_STYLES:
        statuses.add_column(justify="right")
    statuses.add_row(*(Text(name, style="dim") for name, _ in _STATUS_STYLES))
    shown = c.as_dict()
    statuses.add_row(*(Text(f"{shown[n]:,}", style=style) for n, style in _STATUS_STYLES))
    pace = Text(
        f"{_rate(snap)} items/s   ETA {duration(snap.eta)}   elapsed {duration(snap.elapsed)}"
        f"   workers {snap.workers_alive}/{snap.workers}"
        + (f" ({snap.restarts} restarted)" if snap.restarts else "")
    )
    parts: list[RenderableType] = [bar, statuses, pace]
    if snap.errors:
        errors = Text("errors by class: ", style="dim")
        errors.append("   ".join(f"{k} {v:,}" for k, v in snap.errors.items()), style="magenta")
        parts.append(errors)
    if snap.batches is not None:
        parts.append(Text(batches_text(snap.batches), style="cyan"))
    for target, reason in snap.paused.items():
        parts.append(Text(f"target {target} PAUSED: {reason}", style="bold red"))
    return Panel(Group(*parts), title=f"analysisq run {snap.run_id}", title_align="left")


def line(snap: Snapshot) -> str:
    """One plain progress line, for logs and pipes."""
    c = snap.counts
    text = (
        f"[{duration(snap.elapsed)}] {snap.run_id}: {c.terminal}/{c.total} done "
        f"({100 * c.progress:.1f}%) pending={c.pending} processing={c.processing} "
        f"completed={c.completed} retrying={c.retrying} failed={c.failed_for_good} stuck={c.stuck} "
        f"rate={_rate(snap)}/s eta={duration(snap.eta)} "
        f"workers={snap.workers_alive}/{snap.workers} restarts={snap.restarts}"
    )
    if snap.errors:
        text += " errors=" + ",".join(f"{k}:{v}" for k, v in snap.errors.items())
    if snap.batches is not None:
        b = snap.batches
        text += f" in_batches={b.in_batches} open_batches={b.open_batches}"
    if snap.paused:
        text += " paused=" + ",".join(snap.paused)
    return text


def batches_text(b: BatchSummary) -> str:
    share = 100 * b.answered_by_batch / b.answered if b.answered else 0.0
    return (
        f"provider batches: {b.in_batches:,} items waiting in {b.open_batches} open batches; "
        f"{share:.1f}% of answers came through a batch"
    )


class Display:
    """Live panel on a terminal; otherwise a line every *interval* seconds (and at the end)."""

    def __init__(self, console: Console, *, interval: float, live: bool | None = None) -> None:
        self.console = console
        self.interval = interval
        self._live = (
            Live(console=console, refresh_per_second=4, transient=False)
            if (console.is_terminal if live is None else live)
            else None
        )
        self._last_line = 0.0
        self._last: Snapshot | None = None

    def __enter__(self) -> Display:
        if self._live is not None:
            self._live.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._live is not None:
            self._live.stop()
        elif self._last is not None:
            self.console.print(line(self._last), highlight=False, soft_wrap=True)

    def update(self, snap: Snapshot) -> None:
        self._last = snap
        if self._live is not None:
            self._live.update(render(snap))
            return
        now = time.monotonic()
        if now - self._last_line >= self.interval:
            self._last_line = now
            self.console.print(line(snap), highlight=False, soft_wrap=True)

    def note(self, message: str) -> None:
        """A message above the live panel (or a plain line)."""
        self.console.print(message, highlight=False, soft_wrap=True)

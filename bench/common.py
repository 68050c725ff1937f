"""What every benchmark shares: a scratch database, the machine's state, tables and results.

``bench_database`` yields a migrated scratch database: on an embedded PostgreSQL started for
the benchmark (fsync and synchronous_commit off) or, with ``DATABASE_URL`` set, a fresh
database created on that server and dropped afterwards. ``record`` appends one JSON line per
measurement with the date, the machine, its load and the database settings, so that figures
from different days can be compared honestly.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from analysisq.db.embedded import EmbeddedPostgres
from analysisq.db.migrate import migrate

#: The repository root: child processes run there so that ``-m bench...`` imports work.
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS = ROOT / "bench" / "results.jsonl"


@dataclass
class BenchDB:
    """A migrated scratch database and what is known about its server."""

    url: str
    embedded: bool
    fsync: str
    synchronous_commit: str
    server_version: str
    #: Embedded server only: its data directory (``postgres.log`` is there).
    data_dir: Path | None = None

    def describe(self) -> str:
        where = "embedded PostgreSQL" if self.embedded else "PostgreSQL from DATABASE_URL"
        return (
            f"{where} {self.server_version}, fsync={self.fsync}, "
            f"synchronous_commit={self.synchronous_commit}"
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "embedded": self.embedded,
            "fsync": self.fsync,
            "synchronous_commit": self.synchronous_commit,
            "server_version": self.server_version,
        }


def _with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{database}"))


@asynccontextmanager
async def bench_database(
    name: str, *, max_connections: int = 300, preload: Sequence[str] = ()
) -> AsyncIterator[BenchDB]:
    """A scratch database migrated to analysisq's schema, removed on exit.

    *preload*: extensions to load at server start (``pg_stat_statements``), embedded only.
    """
    env_url = os.environ.get("DATABASE_URL")
    server: EmbeddedPostgres | None = None
    tmp: Path | None = None
    if env_url:
        admin_url = env_url
    else:
        tmp = Path(tempfile.mkdtemp(prefix=f"analysisq-bench-{name}-"))
        server = EmbeddedPostgres(tmp, fsync=False, max_connections=max_connections)
        admin_url = await asyncio.to_thread(server.start)
        if preload:
            admin = await asyncpg.connect(admin_url)
            try:
                await admin.execute(
                    f"ALTER SYSTEM SET shared_preload_libraries = '{','.join(preload)}'"
                )
            finally:
                await admin.close()
            await asyncio.to_thread(server.stop)
            admin_url = await asyncio.to_thread(server.start)
    dbname = f"bench_{name}_{os.getpid()}"
    try:
        admin = await asyncpg.connect(admin_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{dbname}"')
            await admin.execute(f'CREATE DATABASE "{dbname}"')
        finally:
            await admin.close()
        url = _with_database(admin_url, dbname)
        conn = await asyncpg.connect(url)
        try:
            await migrate(conn)
            db = BenchDB(
                url=url,
                embedded=server is not None,
                fsync=str(await conn.fetchval("SHOW fsync")),
                synchronous_commit=str(await conn.fetchval("SHOW synchronous_commit")),
                server_version=str(await conn.fetchval("SHOW server_version")),
                data_dir=tmp,
            )
        finally:
            await conn.close()
        yield db
    finally:
        with contextlib.suppress(Exception):
            admin = await asyncpg.connect(admin_url)
            try:
                await admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
            finally:
                await admin.close()
        if server is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(server.stop, "immediate")
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


# -- the machine ------------------------------------------------------------------------------


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


def uptime_line() -> str:
    """``uptime``'s line (the load of this shared machine), or the load averages."""
    try:
        out = subprocess.run(["uptime"], capture_output=True, text=True, check=False, timeout=5)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    one, five, fifteen = load_average()
    return f"load average: {one:.2f}, {five:.2f}, {fifteen:.2f}"


def code_version() -> str:
    """``git describe --always --dirty`` of the checkout measured ("-dirty": uncommitted)."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gib = None
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 1024 / 1024, 1)
    return {
        "host": socket.gethostname(),
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "mem_gib": mem_gib,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


# -- output -----------------------------------------------------------------------------------


@dataclass
class Reporter:
    """Prints tables and appends JSON lines to the results file."""

    results: Path = DEFAULT_RESULTS
    lines: list[dict[str, Any]] = field(default_factory=list)

    def header(self, title: str, db: BenchDB | None = None) -> None:
        print(f"\n== {title} ==", flush=True)
        print(f"date: {now_iso()}   machine: {os.cpu_count()} cores", flush=True)
        print(f"load: {uptime_line()}", flush=True)
        print(f"code: {code_version()}", flush=True)
        if db is not None:
            print(f"database: {db.describe()}", flush=True)

    def record(
        self,
        bench: str,
        case: str,
        metrics: dict[str, Any],
        *,
        params: dict[str, Any] | None = None,
        db: BenchDB | None = None,
    ) -> dict[str, Any]:
        """Append one measurement to the results file and return it."""
        line = {
            "bench": bench,
            "case": case,
            "date": now_iso(),
            "load": [round(x, 2) for x in load_average()],
            "machine": machine(),
            "code": code_version(),
            "database": db.as_json() if db else None,
            "params": params or {},
            "metrics": metrics,
            "argv": sys.argv,
        }
        self.results.parent.mkdir(parents=True, exist_ok=True)
        with self.results.open("a", encoding="utf-8") as f:
            f.write(json.dumps(line, default=str) + "\n")
        self.lines.append(line)
        return line


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (so that it can be pasted into docs/benchmarks.md as it is)."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, v in enumerate(row):
            widths[i] = max(widths[i], len(v))

    def line(values: Sequence[str]) -> str:
        return "| " + " | ".join(v.ljust(widths[i]) for i, v in enumerate(values)) + " |"

    out = [line(list(headers)), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(row) for row in cells]
    return "\n".join(out)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if value >= 100:
            return f"{value:,.0f}"
        if value >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


# -- timing -----------------------------------------------------------------------------------


@contextlib.contextmanager
def stopwatch() -> Iterator[list[float]]:
    """``with stopwatch() as t: ...`` then ``t[0]`` holds the elapsed seconds."""
    box = [0.0]
    start = time.perf_counter()
    try:
        yield box
    finally:
        box[0] = time.perf_counter() - start


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a benchmark child process: this one plus the repository root."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), str(ROOT / "operator"), env.get("PYTHONPATH", "")) if p
    )
    env.update(extra)
    return env


async def copy_prompts(
    conn: asyncpg.Connection, n: int, *, prefix: str = "b", text_bytes: int = 0
) -> None:
    """Load *n* active prompts with COPY (the import path for large sets), each padded with
    filler words to *text_bytes* bytes when that is longer."""

    def text(i: int) -> str:
        head = f"Benchmark prompt {i}: summarise item {i}."
        filler = " lorem ipsum" * max(0, (text_bytes - len(head)) // 12 + 1)
        return (head + filler)[: max(text_bytes, len(head))]

    records = ((f"{prefix}{i:08d}", text(i)) for i in range(n))
    await conn.copy_records_to_table("prompts", records=records, columns=["external_id", "text"])
    await conn.execute("ANALYZE prompts")


def spawn_workers(
    url: str, run_id: str, n: int, log: Path, **env: str
) -> list[subprocess.Popen[bytes]]:
    """*n* production worker processes: ``analysisq worker --run RUN --exit-when-done``."""
    procs = []
    with log.open("ab") as out:
        for _ in range(n):
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "analysisq",
                        "worker",
                        "--run",
                        run_id,
                        "--exit-when-done",
                    ],
                    cwd=ROOT,
                    env=child_env(DATABASE_URL=url, **env),
                    stdout=out,
                    stderr=out,
                )
            )
    return procs


def stop_processes(procs: Sequence[subprocess.Popen[bytes]], timeout: float = 10.0) -> None:
    """SIGTERM the processes still running, then SIGKILL those that do not exit."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def server_cpu_s(pid: int | None) -> float:
    """CPU seconds (user + system) used so far by server process *pid* (0 without one): on a
    shared machine a statement's CPU moves far less with the load than its wall time."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

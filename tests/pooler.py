"""A real PgBouncer in transaction mode in front of a test PostgreSQL.

Debian's ``pgbouncer`` (tests/tools/system-packages.sh) runs from a temporary directory of its
own under /tmp (ini, userlist, log, pid file; owned by ``nobody`` when the tests run as root,
since PgBouncer refuses to run as root) on a free port of 127.0.0.1, forwarding every database name
to the upstream server (``* =`` fallback), with a small server pool so that many clients share
few server connections. ``restart`` stops it hard (SIGKILL: every client connection and every
server connection dies at once) and starts it again on the same port.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

#: Unprivileged user PgBouncer switches to when the tests run as root (it refuses root).
_RUN_AS = "nobody"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pgbouncer_binary() -> str:
    found = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin")
    if found is None:
        raise RuntimeError("pgbouncer is not installed: run tests/tools/system-packages.sh")
    return found


class PgBouncer:
    def __init__(self, upstream_url: str, *, pool_size: int = 10, max_clients: int = 2000) -> None:
        up = urlsplit(upstream_url)
        self.user = up.username or "postgres"
        self._upstream = (up.hostname or "127.0.0.1", up.port or 5432)
        self.dir = Path(tempfile.mkdtemp(prefix="aq-pgbouncer-"))
        self.port = _free_port()
        self.pool_size = pool_size
        self.max_clients = max_clients
        self._proc: subprocess.Popen[bytes] | None = None

    def url(self, database: str) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def _write_config(self) -> Path:
        host, port = self._upstream
        (self.dir / "userlist.txt").write_text(f'"{self.user}" ""\n')
        ini = self.dir / "pgbouncer.ini"
        ini.write_text(
            "[databases]\n"
            f"* = host={host} port={port}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {self.dir / 'userlist.txt'}\n"
            "pool_mode = transaction\n"
            f"default_pool_size = {self.pool_size}\n"
            "min_pool_size = 0\n"
            "reserve_pool_size = 0\n"
            f"max_client_conn = {self.max_clients}\n"
            "server_lifetime = 3600\n"
            "server_idle_timeout = 60\n"
            f"logfile = {self.dir / 'pgbouncer.log'}\n"
            f"pidfile = {self.dir / 'pgbouncer.pid'}\n"
            "admin_users = " + self.user + "\n"
        )
        if os.geteuid() == 0:
            entry = pwd.getpwnam(_RUN_AS)
            for path in (self.dir, *self.dir.iterdir()):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        return ini

    def start(self) -> str:
        ini = self._write_config()
        (self.dir / "pgbouncer.pid").unlink(missing_ok=True)
        args = [pgbouncer_binary(), str(ini)]
        if os.geteuid() == 0:
            args[1:1] = ["-u", _RUN_AS]
        with open(self.dir / "stderr.log", "ab") as err:
            self._proc = subprocess.Popen(
                args, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True
            )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err_text = (self.dir / "stderr.log").read_text(errors="replace")
                raise RuntimeError(f"pgbouncer exited at start: {err_text}{self.log()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self.url("postgres")
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"pgbouncer did not listen on {self.port}: {self.log()[-2000:]}")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def restart(self, down_seconds: float = 0.0) -> None:
        """A crash and a restart: every connection through the pooler is cut."""
        self.stop()
        time.sleep(down_seconds)
        self.start()

    def log(self) -> str:
        path = self.dir / "pgbouncer.log"
        return path.read_text(errors="replace") if path.exists() else ""

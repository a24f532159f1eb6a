"""A real PostgreSQL server for the tests whose workers share one study (Debian's ``postgresql`` package).

Started with the package's own tools: ``initdb`` (trust authentication, so any password is
accepted: tests pass one to check that it is never printed) and ``pg_ctl`` on a free local
port, its socket in the data folder's parent. As root the server runs as the ``postgres``
user, as PostgreSQL requires. ``.ci/run`` installs the package; off CI a machine without it
skips these tests.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

PASSWORD = "hunter2-not-shown"


def binaries() -> Path | None:
    """The newest installed PostgreSQL's bin folder (``/usr/lib/postgresql/<version>/bin``), or None."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parent.parent.name))
    return found[-1].parent if found else None


class Server:
    """One server in a throwaway folder; :meth:`url` gives a database on it, created on first use."""

    def __init__(self) -> None:
        self.bin = binaries()
        if self.bin is None:
            raise RuntimeError("PostgreSQL is not installed: apt-get install -y postgresql")
        self.root = Path(tempfile.mkdtemp(prefix="cotune-pg-"))
        self.root.chmod(0o755)
        self.data = self.root / "data"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            shutil.chown(self.root, "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
        self.start()

    def _run(self, tool: str, *args: str) -> None:
        argv = [str(self.bin / tool), *args]
        if self._as_postgres:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=self.root)
        if done.returncode != 0:
            raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stdout[-2000:]}{done.stderr[-2000:]}")

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-w", "-o",
                  f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
                  "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def restart(self) -> None:
        # Not `pg_ctl restart`: it would drop -l, and the new server would hold our captured output open.
        self.stop()
        self.start()

    def url(self, database: str) -> str:
        """``postgresql://postgres:PASSWORD@127.0.0.1:PORT/DATABASE``, the database created if it is new."""
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres",
                             autocommit=True) as conn:
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone():
                conn.execute(f'CREATE DATABASE "{database}"')
        return f"postgresql://postgres:{PASSWORD}@127.0.0.1:{self.port}/{database}"

    def close(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

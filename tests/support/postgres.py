"""A real PostgreSQL 15 server for the tests: its own folder, its own port, torn down after.

Debian's postgresql-15 package (``make test`` installs it when missing) puts the server's programs
in /usr/lib/postgresql/15/bin. The server runs as the ``postgres`` user when the tests run as root
(PostgreSQL refuses to run as root), on loopback TCP with trust authentication: it is reachable
only from this machine and lives only as long as the test session. Each test gets a database of
its own (:meth:`PostgresServer.new_database`).
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import socket
import subprocess
from pathlib import Path
from types import TracebackType
from typing import Self

PG_BIN_DIRS = (Path("/usr/lib/postgresql/15/bin"),)
_names = itertools.count(1)


def pg_bin(program: str) -> str:
    for folder in PG_BIN_DIRS:
        if (folder / program).is_file():
            return str(folder / program)
    found = shutil.which(program)
    if found is None:
        raise RuntimeError(
            f"PostgreSQL 15's {program} is not installed: `make test` installs Debian's "
            "postgresql-15 package"
        )
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PostgresServer:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.data = folder / "data"
        self.log = folder / "server.log"
        self.port = _free_port()
        self._as_postgres = os.geteuid() == 0

    def _run(self, *argv: str) -> None:
        command = list(argv)
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=120)

    def __enter__(self) -> Self:
        self.folder.mkdir(parents=True, exist_ok=True)
        if self._as_postgres:
            user = pwd.getpwnam("postgres")
            for path in (self.folder, *self.folder.parents):
                if path == Path("/"):
                    break
                os.chmod(path, os.stat(path).st_mode | 0o011)  # the server may pass through
            os.chown(self.folder, user.pw_uid, user.pw_gid)
        self._run(
            pg_bin("initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-instructions",
        )
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.folder} "
            "-c fsync=on -c synchronous_commit=on -c max_connections=200"
        )
        self._run(
            pg_bin("pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-o",
            options,
            "-w",
            "-t",
            "60",
            "start",
        )
        return self

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database; its URL."""
        import psycopg

        name = f"test_{os.getpid()}_{next(_names)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"'.encode())
        return self.url(name)

    def kill_connections(self, database_url: str, application_name: str = "sidecar") -> int:
        """Cut every connection of one database (a network cut, as the server sees it)."""
        import psycopg

        name = database_url.rsplit("/", 1)[1]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            rows = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND application_name = %s",
                (name, application_name),
            ).fetchall()
        return len(rows)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self._run(pg_bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.folder, ignore_errors=True)

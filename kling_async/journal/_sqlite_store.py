"""The SQLite side of the batch journal: the file's layout, reading it, and group commit.

Everything here runs in worker threads (``anyio.to_thread``), never on the event loop: a
``synchronous=FULL`` commit waits for the disk.  One connection per journal serves them all,
one transaction at a time under :attr:`Store.write_lock`.

Group commit: writers append statements to :attr:`Store` 's pending list (a short critical
section on the event loop's thread) and then wait on the store's :class:`Committer`, a thread of
its own that runs :meth:`Store.flush` whenever a writer waits.  A flush commits *everything*
pending at that moment in one transaction, so writers that come while one runs share the next;
the committer wakes the loop once per transaction, and a writer whose statements are committed
already does not wait at all.  (Before, each commit was a trip through anyio's worker threads:
a capacity limiter, a future and a cancel scope per writer, and two flushes racing for the
lock; benchmarks/README.md, "Journal".)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: SQLite's own lock alone (it waits, then fails)
    fcntl = None  # type: ignore[assignment]

from .._errors import JournalError, ValidationError

__all__ = ["SCHEMA_VERSION", "Committer", "Row", "Store"]

#: ``PRAGMA user_version`` of the layout this module writes (version 1 files are upgraded).
SCHEMA_VERSION = 2

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
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{me}\n".encode(), 0)
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
        self.write_lock = threading.Lock()
        self._pending_lock = threading.Lock()
        self._pending: list[tuple[str, Sequence[Any], bool]] = []
        self._synchronous = ""
        self._broken: JournalError | None = None
        #: Transactions committed by :meth:`flush`, and the statements they held.
        self.transactions = 0
        self.committed = 0
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
        with self.write_lock:
            conn.execute("BEGIN IMMEDIATE")
            try:
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
                if version == 0 and tables == 0:
                    for sql in _SCHEMA:
                        conn.execute(sql)
                    conn.executemany("INSERT INTO meta VALUES (?, ?)", sorted(meta.items()))
                    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                    stored = dict(meta)
                elif version not in (1, SCHEMA_VERSION):
                    raise JournalError(
                        f"journal {self.path}: layout version {version} is not the supported"
                        f" {SCHEMA_VERSION} (not a kling_async journal, or from another version)"
                    )
                else:
                    stored = dict(conn.execute("SELECT name, value FROM meta").fetchall())
                    _check_meta(self.path, stored, meta)
                    if version == 1:
                        for sql in _UPGRADE_1:
                            conn.execute(sql)
                        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                    for name in sorted(meta.keys() - stored.keys()):
                        conn.execute("INSERT INTO meta VALUES (?, ?)", (name, meta[name]))
                        stored[name] = meta[name]
                conn.execute(_CHARGES)
                rows = self._read()
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

    def _read(self) -> list[Row]:
        jobs: dict[str, Row] = {}
        for row in self._conn.execute(
            "SELECT key, request_hash, video_url, result, final, reported FROM jobs"
        ):
            jobs[row[0]] = (row, [])
        for row in self._conn.execute(
            "SELECT key, stage, status, intent_at, task_id, snapshot, external_id, adopted"
            " FROM stages"
        ):
            jobs[row[0]][1].append(row)
        return list(jobs.values())

    def add(self, sql: str, params: Sequence[Any], *, durable: bool) -> None:
        """Queue one statement for the next transaction (``durable``: fsync that one)."""
        with self._pending_lock:
            self._pending.append((sql, params, durable))

    def flush(self) -> None:
        """Commit every statement queued so far (blocking; run it in a worker thread).

        Raises :class:`JournalError` once a transaction has failed: what it held is lost, so
        the journal can no longer vouch for anything.
        """
        with self.write_lock:
            if self._broken is not None:
                raise self._broken
            with self._pending_lock:
                statements, self._pending = self._pending, []
            if not statements:
                return  # an earlier flush took them
            try:
                self._apply(statements)
            except sqlite3.Error as exc:
                self._broken = journal_error(self.path, exc)
                raise self._broken from None
            self.transactions += 1
            self.committed += len(statements)

    def _apply(self, statements: list[tuple[str, Sequence[Any], bool]]) -> None:
        conn = self._conn
        # FULL reaches the disk before COMMIT returns; NORMAL survives the process dying but
        # not a power cut.  A FULL commit also makes every NORMAL one before it durable.
        synchronous = "FULL" if any(durable for _, _, durable in statements) else "NORMAL"
        if synchronous != self._synchronous:
            conn.execute(f"PRAGMA synchronous={synchronous}")
            self._synchronous = synchronous
        conn.execute("BEGIN IMMEDIATE")
        try:
            for sql, params, _ in statements:
                conn.execute(sql, params)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def close(self) -> None:
        """Commit what is pending and close the connection (which releases the lock)."""
        try:
            self.flush()
        finally:
            with self.write_lock:
                self._conn.close()
            self._lock.release()


class Committer:
    """Commits a :class:`Store`'s queued statements from one thread of its own, on request.

    :meth:`wait` returns once the first ``wanted`` statements queued are committed.  Waiting is
    shielded: a statement once queued is written even if its writer is cancelled, and the
    writer learns it was (memory and file agree about every submit).
    """

    def __init__(self, store: Store) -> None:
        self._store = store
        self._wake = threading.Condition()
        self._asked = False  # a writer waits: flush (written under _wake)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()
        self._error: BaseException | None = None

    async def wait(self, wanted: int) -> None:
        """Return once ``wanted`` statements are committed (JournalError: they never will be)."""
        if self._store.committed >= wanted:
            return
        if self._error is not None:
            raise self._error
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((wanted, done))
        self.request()
        # Shielded by hand (a journal only runs on asyncio, as its batch does): anyio's
        # CancelScope(shield=True) looks the backend up each time it is made, a fifth of a
        # journaled write's own CPU.  A cancellation waits for the commit, then goes on.
        cancelled: BaseException | None = None
        while True:
            try:
                await asyncio.shield(done)
                break
            except asyncio.CancelledError as exc:
                if done.done():
                    done.result()  # the commit failed: that error, not the cancellation
                    break
                cancelled = exc
        if cancelled is not None:
            raise cancelled

    def request(self) -> None:
        """Have what is queued committed soon, without waiting for it (on the loop's thread).

        A failure reaches the next :meth:`wait` (the store stays broken).
        """
        self._loop = asyncio.get_running_loop()
        with self._wake:
            self._asked = True
            self._wake.notify()
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name=f"kling_async journal {self._store.path}", daemon=True
            )
            self._thread.start()

    def stop(self) -> None:
        """End the thread once it has committed what it was asked to (blocking)."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._asked and not self._stopping:
                    self._wake.wait()
                if not self._asked:
                    return
                self._asked = False
            error: BaseException | None = None
            try:
                self._store.flush()
            except BaseException as exc:  # handed to the waiters, on the loop's thread
                error = exc
            loop = self._loop
            # Nobody waits (a task id's commit is not waited for): no need to wake the loop.
            # A writer that starts waiting meanwhile set _asked first, so this loop flushes
            # once more and settles it then.
            if loop is not None and (self._waiters or error is not None):
                with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits
                    loop.call_soon_threadsafe(self._settle, error)

    def _settle(self, error: BaseException | None) -> None:
        """On the loop: wake the writers whose statements are committed (or failed)."""
        committed = self._store.committed
        if error is not None:
            self._error = error
        waiters = self._waiters
        while waiters and (waiters[0][0] <= committed or error is not None):
            wanted, done = waiters.popleft()
            if done.done():
                continue
            if wanted <= committed:
                done.set_result(None)
            else:
                assert error is not None
                done.set_exception(error)


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


def journal_error(path: str, exc: sqlite3.Error) -> JournalError:
    """The :class:`JournalError` for SQLite's ``exc`` on the journal at ``path``."""
    text = str(exc)
    if "locked" in text or "busy" in text:
        text += " (is another batch using this journal?)"
    return JournalError(f"journal {path}: {text}")

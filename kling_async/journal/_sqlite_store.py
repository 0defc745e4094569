"""The SQLite side of the batch journal: the file's layout, reading it, and group commit.

Opening, reading and closing a journal run in worker threads (``anyio.to_thread``).  Writes are
group commits on the event loop's thread: writers append statements to :class:`Store` 's
pending list, and the :class:`Committer` commits everything pending in one transaction at the
end of the loop's round (``synchronous=NORMAL``: written to the WAL); a thread of its own
fsyncs the WAL for the writers that need their statements on the disk (a submit's intent).
One connection per journal serves them all, one transaction at a time under
:attr:`Store.write_lock`.  Why on the loop: benchmarks/README.md, "Journal" and round three.
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
        self._pending: list[tuple[str, Sequence[Any]]] = []
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
        # Commits reach the WAL, which survives the process dying; the Committer fsyncs the
        # WAL for writers that need their statements on the disk itself (FULL's one addition).
        conn.execute("PRAGMA synchronous=NORMAL")
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

    def add(self, sql: str, params: Sequence[Any]) -> None:
        """Queue one statement for the next transaction."""
        with self._pending_lock:
            self._pending.append((sql, params))

    def flush(self) -> None:
        """Commit every statement queued so far (blocking; takes :attr:`write_lock`).

        Raises :class:`JournalError` once a transaction has failed: what it held is lost, so
        the journal can no longer vouch for anything.
        """
        with self.write_lock:
            self.flush_locked()

    def flush_locked(self) -> None:
        """:meth:`flush`, :attr:`write_lock` being held by the caller."""
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

    def _apply(self, statements: list[tuple[str, Sequence[Any]]]) -> None:
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            for sql, params in statements:
                conn.execute(sql, params)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def open_wal(self) -> int:
        """A descriptor of the journal's WAL file, to fsync it (see :class:`Committer`).

        ``synchronous=NORMAL`` writes each commit to the WAL without syncing it; syncing the
        WAL after a commit is exactly what ``FULL`` adds in WAL mode (sqlite.org/pragma.html
        #pragma_synchronous).  Before the first write the WAL may not exist: the database
        file then holds everything, and is synced instead.
        """
        try:
            return os.open(self.path + "-wal", os.O_RDONLY)
        except FileNotFoundError:
            return os.open(self.path, os.O_RDONLY)

    def close(self) -> None:
        """Commit what is pending and close the connection (which releases the lock)."""
        try:
            self.flush()
        finally:
            with self.write_lock:
                self._conn.close()
            self._lock.release()


class Committer:
    """Commits a :class:`Store`'s queued statements on the event loop's thread, in groups.

    Everything queued while the loop runs one round of callbacks goes into one transaction, at
    the end of that round (``synchronous=NORMAL``: written to the WAL, which survives the
    process dying).  A writer that needs its statement on the disk itself (a submit's intent:
    ``durable``) also waits for an ``fsync`` of the WAL, which a thread of the committer's own
    makes: one fsync covers every transaction committed before it started, and while one runs,
    the next collects the writers that come meanwhile (group commit).

    Why not commit from that thread too, as before: each statement released and took back the
    GIL, and the loop and the thread took turns at it; a journaled batch of short tasks spent
    twice the CPU of an unjournaled one (benchmarks/README.md, round three).  The loop pays a
    transaction's statements itself now (tens of microseconds a job) and no thread switch but
    one per fsync.

    :meth:`wait` returns once the first ``wanted`` statements queued are committed (and, with
    ``durable``, on the disk).  Waiting is shielded: a statement once queued is written even if
    its writer is cancelled, and the writer learns it was (memory and file agree about every
    submit).
    """

    def __init__(self, store: Store) -> None:
        self._store = store
        self._loop: asyncio.AbstractEventLoop | None = None
        self._planned = False  # a commit is planned at the end of this round of the loop
        self._stopped = False
        # statements committed -> writers waiting for them: (wanted, durable, their future)
        self._waiters: deque[tuple[int, bool, asyncio.Future[None]]] = deque()
        self._error: BaseException | None = None
        #: Statements known to be on the disk (an fsync of the WAL ended after their commit).
        self.synced = 0
        self.syncs = 0
        self._sync_asked = 0  # the statements the fsync in flight (or asked for) covers
        self._sync_busy = False
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    def stop(self) -> None:
        """End the fsync thread once its fsync is made (blocking: run it in a worker thread)."""
        with self._wake:
            self._stopped = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    async def wait(self, wanted: int, *, durable: bool = False) -> None:
        """Return once ``wanted`` statements are committed (``durable``: and on the disk).

        Raises :class:`JournalError` when they never will be (a transaction failed).
        """
        if self._store.committed >= wanted and (not durable or self.synced >= wanted):
            return
        if self._error is not None:
            raise self._error
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((wanted, durable, done))
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
        """Have what is queued committed at the end of this round of the loop, unwaited for.

        A failure reaches the next :meth:`wait` (the store stays broken).
        """
        if not self._planned:
            self._planned = True
            self._loop = loop = asyncio.get_running_loop()
            loop.call_soon(self._commit)

    def _commit(self) -> None:
        """On the loop: commit what is queued, wake whom that serves, start an fsync if asked."""
        self._planned = False
        if self._stopped or self._error is not None:
            return
        store = self._store
        if not store.write_lock.acquire(blocking=False):
            # Someone else holds the connection (closing it, say): try again in a moment.
            self._planned = True
            assert self._loop is not None
            self._loop.call_later(0.001, self._commit)
            return
        try:
            store.flush_locked()
        except BaseException as exc:  # (JournalError) handed to every waiter
            self._fail(exc)
            return
        finally:
            store.write_lock.release()
        self._settle()

    def _settle(self) -> None:
        """Wake the writers whose statements are committed (and synced where they need it)."""
        committed, synced = self._store.committed, self.synced
        unsynced = 0
        kept: deque[tuple[int, bool, asyncio.Future[None]]] = deque()
        for wanted, durable, done in self._waiters:
            if done.done():
                continue
            if wanted <= committed and (not durable or wanted <= synced):
                done.set_result(None)
                continue
            if durable and wanted <= committed:
                unsynced = max(unsynced, wanted)
            kept.append((wanted, durable, done))
        self._waiters = kept
        if unsynced and not self._sync_busy:
            self._start_sync(committed)

    def _start_sync(self, upto: int) -> None:
        self._sync_busy = True
        with self._wake:
            self._sync_asked = upto
            self._wake.notify()
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name=f"kling_async journal {self._store.path}", daemon=True
            )
            self._thread.start()

    def _run(self) -> None:
        """The fsync thread: make the WAL (with every transaction asked for) reach the disk."""
        fd: int | None = None
        done = 0
        try:
            while True:
                with self._wake:
                    while self._sync_asked <= done and not self._stopped:
                        self._wake.wait()
                    if self._sync_asked <= done:
                        return
                    upto = self._sync_asked
                error: BaseException | None = None
                try:
                    if fd is None:
                        fd = self._store.open_wal()
                    os.fsync(fd)
                except OSError as exc:
                    error = journal_error(self._store.path, sqlite3.OperationalError(str(exc)))
                done = upto
                loop = self._loop
                if loop is not None:
                    with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits
                        loop.call_soon_threadsafe(self._synced, upto, error)
                if error is not None:
                    return
        finally:
            if fd is not None:
                os.close(fd)

    def _synced(self, upto: int, error: BaseException | None) -> None:
        """On the loop: an fsync ended; it covered the first ``upto`` statements."""
        self._sync_busy = False
        if error is not None:
            self._fail(error)
            return
        self.syncs += 1
        self.synced = max(self.synced, upto)
        self._settle()

    def _fail(self, error: BaseException) -> None:
        self._error = error
        waiters, self._waiters = self._waiters, deque()
        for _, _, done in waiters:
            if not done.done():
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

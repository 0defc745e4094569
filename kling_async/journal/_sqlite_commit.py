"""Group commit for the SQLite journal: transactions on the event loop, fsyncs in one thread.

Writers queue statements (:meth:`Committer.add`) and wait for them (:meth:`Committer.wait`).
The loop commits everything queued in one transaction a moment later (one per loop turn at
most, :data:`FLUSH_GAP` apart), with ``synchronous=NORMAL``: SQLite's WAL then writes to the
operating system without waiting for the disk, which survives the process dying, and is what
every write but a submit's intent needs.  An intent must also survive a power cut before its
request leaves: its writer waits until a thread of the journal's own has fsynced the WAL after
that commit (one fsync for every intent committed meanwhile).  The same thread runs the WAL
checkpoints, which SQLite would otherwise run on the loop, fsyncs included.

Why not all in a thread, as before: a thread that runs SQLite competes with the loop for the
GIL statement by statement, and every hand-over costs a wake-up each way.  A journaled batch
spent more on that than on SQLite itself; here the loop pays for its statements and nothing
else (benchmarks/README.md, "2026-11-30 (2)").

``NORMAL`` is safe from corruption in WAL mode, and an fsync of the WAL after a commit makes
that commit as durable as ``synchronous=FULL`` would: SQLite syncs the WAL before a checkpoint
copies it, and syncs the database before it starts the WAL over.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from .._errors import JournalError
from ._sqlite_store import Store

__all__ = ["CHECKPOINT_EVERY", "FLUSH_GAP", "Committer"]

#: Seconds between two transactions at least: statements queued meanwhile share the next one.
FLUSH_GAP = 0.002
#: Transactions between two WAL checkpoints (run by the sync thread, not the loop).
CHECKPOINT_EVERY = 256


class Committer:
    """Queues a :class:`Store`'s statements, commits them on the loop, syncs them in a thread.

    :meth:`wait` is shielded: a statement once queued is written even if its writer is
    cancelled, and the writer learns it was (memory and file agree about every submit).
    """

    def __init__(self, store: Store, *, checkpoint_every: int = CHECKPOINT_EVERY) -> None:
        self._store = store
        self._checkpoint_every = checkpoint_every
        self._pending: list[tuple[Any, ...]] = []  # rows of the change log
        #: Statements queued, committed, and committed and fsynced, since the journal opened.
        self.queued = 0
        self.committed = 0
        self.synced = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flush_at: asyncio.TimerHandle | asyncio.Handle | None = None
        self._last_flush = -1.0
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()  # for a commit
        self._waiting_sync: deque[tuple[int, asyncio.Future[None]]] = deque()  # for an fsync
        self._error: JournalError | None = None
        self._error_told = False  # whether a writer was given the error (else close raises it)
        self._checkpointed = 0  # store.transactions at the last checkpoint asked for
        self._closed = False
        self._syncer = _Syncer(store, self._synced)

    def add(self, row: tuple[Any, ...]) -> None:
        """Queue one change (an operation code and its values) for the next transaction.

        On the loop's thread.
        """
        self._pending.append(row)
        self.queued += 1
        if self._flush_at is None:
            self._schedule()

    async def wait(self, wanted: int, *, durable: bool = False) -> None:
        """Return once the first ``wanted`` statements are committed (``durable``: and synced).

        Raises :class:`JournalError` when they never will be: the journal failed.
        """
        loop = self._loop or asyncio.get_running_loop()
        queue = self._waiting_sync if durable else self._waiting
        cancelled: BaseException | None = None
        while True:
            if self._error is not None:
                self._error_told = True
                raise self._error
            if (self.synced if durable else self.committed) >= wanted:
                break  # (a cancelled writer whose commit came meanwhile: nobody settles it now)
            done: asyncio.Future[None] = loop.create_future()
            queue.append((wanted, done))
            if durable and self.committed >= wanted:
                self._syncer.request(loop, self.committed)  # (committed while it was cancelled)
            try:
                await done
                break
            except asyncio.CancelledError as exc:
                # A cancellation waits for the commit, then goes on (shielded by hand: anyio's
                # CancelScope(shield=True) costs a backend lookup per write).
                if done.done() and not done.cancelled():
                    done.result()  # the journal failed: that error, not the cancellation
                    break
                cancelled = exc
        if cancelled is not None:
            raise cancelled

    def flush(self) -> None:
        """Commit what is queued now (on the loop; :meth:`stop` commits the rest at close)."""
        self._flush_at = None
        if not self._pending or self._error is not None or self._closed:
            return
        if not self._store.write_lock.acquire(blocking=False):
            # A checkpoint (or a test holding the file still) has the connection: try again.
            self._schedule(later=True)
            return
        try:
            self._commit_pending()
        except JournalError as exc:
            self._fail(exc)
            return
        finally:
            self._store.write_lock.release()
        self._last_flush = time.monotonic()
        _settle(self._waiting, self.committed)
        if self._waiting_sync and self._loop is not None:
            self._syncer.request(self._loop, self.committed)
        transactions = self._store.transactions
        if transactions - self._checkpointed >= self._checkpoint_every and self._loop is not None:
            self._checkpointed = transactions
            self._syncer.request(self._loop, self.synced, checkpoint=True)

    def close(self) -> None:
        """On the loop, before :meth:`stop`: no more transactions from the loop."""
        self._closed = True
        if self._flush_at is not None:
            self._flush_at.cancel()
            self._flush_at = None

    def stop(self) -> None:
        """Commit what is queued and end the sync thread (blocking; after :meth:`close`).

        Raises the :class:`JournalError` of a transaction that failed when no writer waited
        for it (only marks, charges or task ids not waited for were lost): a batch must not
        end as if its journal were up to date.
        """
        try:
            with self._store.write_lock:
                if self._pending and self._error is None:
                    self._commit_pending()
        finally:
            self._syncer.stop()  # (a failed last transaction must not leave the thread waiting)
        if self._error is not None and not self._error_told:
            self._error_told = True
            raise self._error

    def _commit_pending(self) -> None:
        """Commit everything queued as one transaction (the caller holds the write lock)."""
        statements, self._pending = self._pending, []
        self._store.apply(statements)
        self.committed += len(statements)

    def _schedule(self, *, later: bool = False) -> None:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        wait = FLUSH_GAP if later else self._last_flush + FLUSH_GAP - time.monotonic()
        if wait > 0:
            self._flush_at = loop.call_later(wait, self.flush)
        else:
            self._flush_at = loop.call_soon(self.flush)

    def _synced(self, upto: int, error: JournalError | None) -> None:
        """On the loop: the sync thread fsynced every statement up to ``upto`` (or failed)."""
        if error is not None:
            self._fail(error)
            return
        self.synced = max(self.synced, upto)
        _settle(self._waiting_sync, self.synced)

    def _fail(self, error: JournalError) -> None:
        self._error = error
        for queue in (self._waiting, self._waiting_sync):
            while queue:
                _, done = queue.popleft()
                if not done.done():
                    done.set_exception(error)
                    self._error_told = True


def _settle(queue: deque[tuple[int, asyncio.Future[None]]], upto: int) -> None:
    while queue and queue[0][0] <= upto:
        _, done = queue.popleft()
        if not done.done():
            done.set_result(None)


class _Syncer:
    """The journal's thread: fsyncs the WAL after commits that must be durable, checkpoints."""

    def __init__(self, store: Store, report: Callable[[int, JournalError | None], None]) -> None:
        self._store = store
        self._report = report  # called on the loop
        self._wake = threading.Condition()
        self._wanted = 0  # fsync every statement committed up to this count
        self._checkpoint = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def request(
        self, loop: asyncio.AbstractEventLoop, upto: int, *, checkpoint: bool = False
    ) -> None:
        """Have statements up to ``upto`` (committed) fsynced soon; ``checkpoint``: and copied."""
        self._loop = loop
        with self._wake:
            if upto <= self._wanted and not checkpoint:
                return  # asked already: its fsync will cover this commit too
            self._wanted = max(self._wanted, upto)
            self._checkpoint = self._checkpoint or checkpoint
            self._wake.notify()
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name=f"kling_async journal {self._store.path}", daemon=True
            )
            self._thread.start()

    def stop(self) -> None:
        """End the thread once it has done what it was asked to (blocking)."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        done = 0
        while True:
            with self._wake:
                while self._wanted <= done and not self._checkpoint and not self._stopping:
                    self._wake.wait()
                if self._wanted <= done and not self._checkpoint:
                    return  # stopping, with nothing left to do
                upto, checkpoint, self._checkpoint = self._wanted, self._checkpoint, False
            error: JournalError | None = None
            try:
                if checkpoint:
                    self._store.checkpoint()  # (syncs the WAL before it copies it)
                if upto > done:
                    self._store.sync()
                done = upto
            except JournalError as exc:
                error = exc
            loop = self._loop
            if loop is not None:
                with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits
                    loop.call_soon_threadsafe(self._report, upto, error)
            if error is not None:
                return

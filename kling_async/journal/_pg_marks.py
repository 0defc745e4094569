"""A PostgreSQL journal worker's writes in the background: marks, meta, kept slots, its lease.

Three kinds of write need no one to wait for them, so a :class:`MarkWriter` queues them and
commits them as they come, in a task of the batch (:meth:`MarkWriter.run`):

* "taken" marks (a result the consumer has got, :meth:`MarkWriter.mark`);
* server facts for the journal's meta (:meth:`MarkWriter.set_meta`);
* the task slots of timed-out jobs that go back to the account now (:meth:`MarkWriter.end_slots`;
  the journal writes those, since each is fenced by its job's claim).

The same task renews the worker's lease every ``renew`` seconds.  Every write here may run
again (each is idempotent), so a failed one is simply kept for the next.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Iterable

import anyio

from .._errors import JournalError
from ._config import PostgresJournal
from ._pg_claims import renew_lease, write_marks
from ._pg_conn import Db

__all__ = ["MarkWriter"]

logger = logging.getLogger("kling_async")

#: Seconds before a renewal that failed is tried again (each try itself retries for up to
#: ``connect_timeout``, see ``Db``).
RENEW_RETRY = 0.1


class MarkWriter:
    """Queues a worker's marks, meta and ended slots; commits them; renews the worker's lease.

    ``end_slots`` writes the given jobs' slots back to the account (fenced by their claims).
    """

    def __init__(
        self,
        db: Db,
        config: PostgresJournal,
        worker: str,
        path: str,
        end_slots: Callable[[list[str]], Awaitable[None]],
    ) -> None:
        self._db = db
        self._config = config
        self._worker = worker
        self._path = path
        self._end_slots = end_slots
        self._marks: list[str] = []
        self._meta: dict[str, str] = {}
        self._ended: list[str] = []
        self._queued = anyio.Event()

    def mark(self, key: str) -> None:
        """Queue the mark that ``key``'s result was taken by the consumer."""
        self._marks.append(key)
        self._queued.set()

    def set_meta(self, name: str, value: str) -> None:
        """Queue a meta value (a later one of the same name wins)."""
        self._meta[name] = value
        self._queued.set()

    def end_slots(self, keys: Iterable[str]) -> None:
        """Queue the slots of ``keys`` (jobs that kept theirs) to go back to the account."""
        self._ended.extend(keys)
        self._queued.set()

    async def run(self) -> None:
        """Commit what is queued as it comes and renew the lease, until cancelled.

        A broken journal (lease lost, a job taken over) ends it quietly: the batch's next write
        raises the error.  A database out of reach for longer than ``connect_timeout`` does
        not: the marks are written with the next ones (or at close), and the lease is renewed
        on, as long as the database comes back before it expires.
        """
        async with anyio.create_task_group() as group:

            async def renew() -> None:
                await self._renew()
                group.cancel_scope.cancel()  # the lease is lost: nothing more to do here

            group.start_soon(renew)
            while True:
                await self._queued.wait()
                self._queued = anyio.Event()
                try:
                    await self.flush()
                except JournalError:
                    if self._db.broken is not None:
                        break
                    # (not the lease's end: ending here also ended its renewal, and the
                    # worker went on running its jobs until others took them over)
                    logger.warning("journal %s: marks kept for the next write", self._path)
            group.cancel_scope.cancel()

    async def flush(self) -> None:
        """Commit everything queued now (what fails stays queued for the next flush)."""
        keys, self._marks = self._marks, []
        meta, self._meta = self._meta, {}
        ended, self._ended = self._ended, []
        try:
            if ended:
                await self._end_slots(ended)
            if keys or meta:
                work = functools.partial(write_marks, keys=keys, meta=meta, worker=self._worker)
                with anyio.CancelScope(shield=True):
                    await self._db.tx(work)
        except BaseException:
            # Written with the next ones: every write here may run again.
            self._marks[:0] = keys
            self._meta = {**meta, **self._meta}
            self._ended[:0] = ended
            raise

    async def _renew(self) -> None:
        """Renew the lease every ``renew`` seconds; an expired lease breaks the journal."""
        pause = self._config.renew
        while True:
            await anyio.sleep(pause)

            work = functools.partial(renew_lease, worker=self._worker, lease=self._config.lease)
            try:
                renewed = await self._db.tx(work)
            except JournalError:
                # The database may come back before the lease runs out: try again soon (a
                # whole ``renew`` later may be past the lease, the database back long before).
                pause = min(self._config.renew, RENEW_RETRY)
                continue
            pause = self._config.renew
            if not renewed:
                self._db.broken = JournalError(
                    f"journal {self._path}: this worker's lease expired (not renewed for"
                    f" {self._config.lease:g} s); its jobs may be another worker's now"
                )
                return

"""The jobs of a batch on a shared journal: loaded once, then claimed one at a time.

:class:`ClaimSource` replaces :class:`kling_async._source.JobSource` when the batch's journal is
shared (PostgreSQL): instead of handing out the caller's jobs in order, it records them all in
the journal (idempotent: every worker loads the same jobs) and then hands out whichever job the
journal lets this worker claim, until every job of the batch is done, by any worker.  A worker
with nothing to claim waits and looks again, so that it can take over the jobs of a worker that
dies; it ends when the whole batch is done.

When nothing could be claimed for ``RetryPolicy.max_slot_wait`` because no task slot of the
account was free (timed-out tasks keep theirs until they end; other clients may hold the
rest), the next pending job is claimed without a slot and handed out as :class:`Slotless`:
it ends as a ``ConcurrencyLimitError`` result, as a job of a batch without a shared journal
does, and so do the jobs after it while no slot frees.  The batch completes; a rerun runs them.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Iterable
from typing import Any, Literal, NamedTuple

import anyio

from .._errors import ValidationError
from .._jobs import LipSyncJob
from .._results import JobResult
from .._slots import SlotHold, TaskSlots
from ._codec import request_hash
from ._contract import SharedBackend

__all__ = ["ClaimSource", "SharedSlotHold", "Slotless"]


class Slotless(NamedTuple):
    """A job claimed without a task slot after ``max_slot_wait``: it must not be submitted."""

    key: str
    job: LipSyncJob


class ClaimSource:
    """Hands one worker's runners the jobs it claims (same interface as ``JobSource``).

    When nothing can be claimed, a runner waits (:meth:`SharedBackend.wait_for_slot`) and asks
    again.
    """

    def __init__(
        self,
        journal: SharedBackend,
        jobs: Iterable[Any] | AsyncIterable[Any],
        max_slot_wait: float = float("inf"),
    ) -> None:
        self._journal = journal
        self._input = jobs
        self._max_slot_wait = max_slot_wait
        self._jobs: dict[str, LipSyncJob] | None = None
        self._lock = anyio.Lock()
        self._done = False
        self._unclaimed_since: float | None = None  # since when nothing could be claimed

    def next_nowait(self) -> Literal[False]:
        """Always False: claiming needs the database (see :meth:`next`)."""
        return False

    async def next(self) -> tuple[str, Any] | Slotless | JobResult | None:
        """``(key, job)`` to run, a dead worker's unreported result, or None: batch done.

        Or :class:`Slotless`: a job to end unsubmitted (no slot was free for ``max_slot_wait``).

        None comes once every job of the batch is done, by any worker.  Raises
        :class:`~kling_async.ValidationError` (before anything is claimed) for a duplicate key,
        an item that is no job, or a job that differs from the journal's record.
        """
        async with self._lock:  # one runner asks the database at a time; the others queue here
            if self._done:
                return None
            if self._jobs is None:
                self._jobs = await self._load()
            while True:
                since = self._unclaimed_since
                starved = since is not None and anyio.current_time() - since >= self._max_slot_wait
                got = await self._journal.claim(without_slot=starved)
                if got is False:
                    self._done = True
                    return None
                if isinstance(got, JobResult):
                    return got
                if isinstance(got, str):
                    if not self._journal.holds_slot(got):
                        return Slotless(got, self._jobs[got])  # (the wait goes on for the next)
                    self._unclaimed_since = None
                    return got, self._jobs[got]
                if since is None:
                    self._unclaimed_since = anyio.current_time()
                await self._journal.wait_for_slot()

    async def _load(self) -> dict[str, LipSyncJob]:
        jobs: dict[str, LipSyncJob] = {}
        rows: list[tuple[str, str, str | None]] = []
        index = 0

        def add(job: object) -> None:
            nonlocal index
            if not isinstance(job, LipSyncJob):
                self._done = True
                raise ValidationError(
                    "job", f"must be a LipSyncJob, not {type(job).__name__} (shared journal)"
                )
            key = job.key or str(index)
            index += 1
            if key in jobs:
                self._done = True
                raise ValidationError(
                    "key", f"{key!r} names two jobs of this batch; a journal needs unique keys"
                )
            jobs[key] = job
            rows.append((key, request_hash(job), job.video_url))

        if isinstance(self._input, AsyncIterable):
            async for job in self._input:
                add(job)
        else:
            for job in self._input:
                add(job)
        try:
            await self._journal.load(rows)
        except ValidationError:
            self._done = True
            raise
        return jobs


class SharedSlotHold(SlotHold):
    """A job's local slot that, when let go, also lets go of the job's slot in the journal.

    Only a slot the journal kept for a timed-out task is affected (the journal gives every
    other one back with the result): the batch lets go of that one when the task is seen to
    end, or when the batch stops following it.
    """

    __slots__ = ("_journal", "_key")

    def __init__(
        self, slots: TaskSlots, journal: SharedBackend, key: str, *, held: bool = True
    ) -> None:
        super().__init__(slots, held=held)
        self._journal = journal
        self._key = key

    def release(self) -> None:
        """Give the slot back (here and, if it kept one, in the journal)."""
        super().release()
        self._journal.slot_ended(self._key)

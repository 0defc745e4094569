"""Reading a batch's jobs: lazily, one at a time, keyed, and checked against the journal.

Several runners (one per task slot, :mod:`._batch`) share one :class:`JobSource`.  A job is read
only when a runner holds a slot for it or waits for one (one job a runner at most), so a
million-job generator is never read far ahead.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from typing import Any, Literal

import anyio

from ._jobs import LipSyncJob
from ._results import JobResult
from ._resume import SKIP, Resume

__all__ = ["JobSource"]

_END = object()


class JobSource:
    """The jobs of one batch, handed out one at a time to whichever runner asks.

    Each job gets its key (``job.key``, else its position) and, with a journal, the journal's
    verdict (:meth:`Resume.admit`): a job it already finished comes out as its stored result,
    one whose result was taken is skipped.
    """

    def __init__(
        self, jobs: Iterable[Any] | AsyncIterable[Any], resume: Resume | None = None
    ) -> None:
        self._sync: Iterator[Any] | None = None
        self._async: AsyncIterator[Any] | None = None
        if isinstance(jobs, AsyncIterable):
            self._async = aiter(jobs)
        else:
            self._sync = iter(jobs)
        # An async iterator must not be entered by a second runner while the first waits in it.
        self._lock = anyio.Lock(fast_acquire=True)
        self._resume = resume
        self._index = 0
        self._done = False

    async def next(self) -> tuple[str, Any] | JobResult | None:
        """``(key, job)`` to run, a result the journal holds, or None once the jobs are done.

        Raises :class:`~kling_async.ValidationError` for a duplicate key or a job that differs
        from the journal's record; no job is handed out after that.
        """
        if self._sync is not None:
            # No await for a plain iterable: the lock is only for async ones.
            return self._next_sync(self._sync)
        async with self._lock:
            while not self._done:
                try:
                    job = await anext(self._async)  # type: ignore[arg-type]
                except StopAsyncIteration:
                    break
                item = self._admit(job)
                if item is not None:
                    return item
            self._done = True
            return None

    def next_nowait(self) -> tuple[str, Any] | JobResult | Literal[False] | None:
        """:meth:`next` without a coroutine, for a plain iterable; False for an async one."""
        if self._sync is None:
            return False
        return self._next_sync(self._sync)

    def _next_sync(self, jobs: Iterator[Any]) -> tuple[str, Any] | JobResult | None:
        while not self._done:
            job = next(jobs, _END)
            if job is _END:
                break
            item = self._admit(job)
            if item is not None:
                return item
        self._done = True
        return None

    def _admit(self, job: Any) -> tuple[str, Any] | JobResult | None:
        key = job.key if isinstance(job, LipSyncJob) and job.key else str(self._index)
        self._index += 1
        if self._resume is None:
            return key, job
        try:
            known = self._resume.admit(key, job)
        except BaseException:
            self._done = True
            raise
        if known is SKIP:
            return None
        return known if known is not None else (key, job)

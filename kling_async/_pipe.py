"""The pipe that carries a batch's results from its runners to its consumer.

Not an anyio memory object stream: a runner hands a result over without waiting (its place was
reserved before the job started), and the consumer takes one without a trip through the event
loop when one is waiting.  The stream's machinery around that (a checkpoint and an event per
blocking receive, a check of the receiver's cancellation per send) cost a few microseconds a
result, a measurable share of a batch's own CPU (benchmarks/README.md, "Overhead").
"""

from __future__ import annotations

from collections import deque

import anyio

from ._results import JobResult

__all__ = ["ResultPipe"]


class ResultPipe:
    """Results on their way to the consumer, and the places that bound how many there are.

    A runner takes a place (:meth:`reserve`) before it reads a job, hands the job's result over
    with :meth:`put`, and the place comes free when the consumer takes it (:meth:`take`).  So
    jobs running plus results not yet taken never exceed ``capacity``: a consumer that stops
    reading stops the batch from reading jobs.
    """

    def __init__(self, capacity: int) -> None:
        self._free = capacity
        self._results: deque[JobResult] = deque()
        self._reservers: deque[anyio.Event] = deque()  # runners waiting for a place
        self._arrival: anyio.Event | None = None  # what a waiting consumer waits for
        self._closed = False  # no result will come any more
        self._abandoned = False  # the consumer has gone: results are dropped
        # Task ids of the results dropped so: paid tasks the consumer was never given, which a
        # stopped batch names (``running_task_ids``), or nothing would tell of them.
        self._dropped: list[str] = []

    # -- the runners' side -------------------------------------------------------------------

    def try_reserve(self) -> bool:
        """Take a place if one is free (and nobody waits for one); no waiting."""
        if self._free > 0 and not self._reservers:
            self._free -= 1
            return True
        return False

    async def reserve(self) -> None:
        """Take a place, waiting for one to free (first come, first served)."""
        if self.try_reserve():
            return
        event = anyio.Event()
        self._reservers.append(event)
        try:
            await event.wait()
        except BaseException:
            if event.is_set():
                self.unreserve()  # handed a place just as we were cancelled: pass it on
            else:
                self._reservers.remove(event)
            raise

    def unreserve(self) -> None:
        """Give a place back unused (there was no job for it)."""
        if self._reservers:
            self._reservers.popleft().set()  # the place goes straight to the next in line
        else:
            self._free += 1

    def put(self, result: JobResult) -> None:
        """Hand ``result`` over, in the place reserved for it; never waits."""
        if self._abandoned:
            if result.task_id is not None:
                self._dropped.append(result.task_id)
            return
        self._results.append(result)
        arrival, self._arrival = self._arrival, None
        if arrival is not None:
            arrival.set()

    def close(self) -> None:
        """No more results will come: the consumer ends once it has taken the last one."""
        self._closed = True
        arrival, self._arrival = self._arrival, None
        if arrival is not None:
            arrival.set()

    # -- the consumer's side -----------------------------------------------------------------

    def take_nowait(self) -> JobResult | None:
        """The next result if one is waiting, else None; frees its place."""
        if not self._results:
            return None
        if self._reservers:  # (unreserve, inline: once per result)
            self._reservers.popleft().set()
        else:
            self._free += 1
        return self._results.popleft()

    async def take(self) -> JobResult:
        """The next result, waiting for one; raises :exc:`anyio.EndOfStream` after the last."""
        while True:
            result = self.take_nowait()
            if result is not None:
                return result
            if self._closed:
                raise anyio.EndOfStream
            if self._arrival is None:
                self._arrival = anyio.Event()
            await self._arrival.wait()

    def abandon(self) -> None:
        """The consumer has gone: drop what waits and whatever comes (their task ids are kept)."""
        self._abandoned = True
        self._dropped.extend(r.task_id for r in self._results if r.task_id is not None)
        self._results.clear()

    def untaken(self) -> list[str]:
        """Task ids of the results handed over and not taken: waiting, or dropped unread."""
        return [*self._dropped, *(r.task_id for r in self._results if r.task_id is not None)]

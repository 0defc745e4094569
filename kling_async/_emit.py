"""Delivering a batch's events to its ``on_event`` callback (see :mod:`kling_async.events`).

The batch calls :class:`EventSink` synchronously wherever something happens.  A plain callback
runs right there; a coroutine function's coroutines wait in an unbounded queue that
:meth:`EventSink.run` awaits one by one, so that emitting never blocks the batch.  Failures of
the callback are logged once and swallowed.  :data:`CURRENT` carries the sink to code that
serves many batches (the client's requester) through the batch's tasks' context.
"""

from __future__ import annotations

import contextvars
import inspect
import logging
import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskGroup

from ._errors import BudgetExceededError, ValidationError
from ._results import JobResult
from .events import BudgetExceeded, Event, Finished, Resumed

if TYPE_CHECKING:
    from .journal._sqlite import JournalJob  # (the type only: the requester imports this module)

__all__ = ["CURRENT", "DRAIN_SECONDS", "EventSink", "check_callback"]

logger = logging.getLogger("kling_async")

#: Seconds a finished batch waits for an async callback to work through its queued events.
DRAIN_SECONDS = 5.0

#: The sink of the batch whose task is running (None outside batches, or without a callback).
CURRENT: contextvars.ContextVar[EventSink | None] = contextvars.ContextVar(
    "kling_async_event_sink", default=None
)


def check_callback(callback: object) -> None:
    """Raise :class:`~kling_async.ValidationError` unless ``callback`` is None or callable."""
    if callback is not None and not callable(callback):
        raise ValidationError("on_event", "must be a function taking an event, or None")


class EventSink:
    """Calls ``callback`` with each event; see the module docstring."""

    def __init__(self, callback: Callable[[Event], Any]) -> None:
        self._callback = callback
        self._send, self._receive = anyio.create_memory_object_stream[Any](math.inf)
        self.failures = 0
        self._done = anyio.Event()

    def __call__(self, event: Event) -> None:
        """Deliver ``event`` (a coroutine callback's call is queued, to be awaited in order)."""
        try:
            outcome = self._callback(event)
        except Exception:
            self._failed()
            return
        if inspect.isawaitable(outcome):
            try:
                self._send.send_nowait(outcome)
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                _close(outcome)  # the batch has ended: never awaited

    def start(self, group: TaskGroup) -> None:
        """Serve the batch running this task: :meth:`run` in ``group``, and :data:`CURRENT`."""
        group.start_soon(self.run)
        CURRENT.set(self)  # (this task's context, copied into the tasks it starts from now on)

    async def finish(self) -> None:
        """No more events: give the queued ones up to :data:`DRAIN_SECONDS` to be delivered."""
        self.close()
        with anyio.move_on_after(DRAIN_SECONDS, shield=True):
            await self._done.wait()

    def finished(self, result: JobResult) -> None:
        """Report :class:`~kling_async.events.Finished` (after ``BudgetExceeded`` when it was)."""
        error = result.error
        if isinstance(error, BudgetExceededError):
            limit, spent = error.limit, error.spent
            self(BudgetExceeded(key=result.key, units=error.units, spent=spent, limit=limit))
        self(Finished(result=result))

    def resumed(self, jobs: Iterable[JournalJob], failures_too: bool) -> None:
        """Report :class:`~kling_async.events.Resumed`: the journal's results already taken.

        Those a rerun does not report again: final and taken (failures only if
        ``failures_too``: with ``retry_failed`` they run again).
        """
        kept = tuple(
            job.result
            for job in jobs
            if job.final and job.reported and job.result is not None
            if failures_too or job.result.ok
        )
        self(Resumed(results=kept))

    async def run(self) -> None:
        """Await the queued coroutines one after another until :meth:`close` (a batch's task)."""
        try:
            async for outcome in self._receive:
                try:
                    await outcome
                except Exception:
                    self._failed()
        finally:
            # Cancelled: what is left is never awaited (closed, so that Python does not warn).
            for outcome in _leftover(self._receive):
                _close(outcome)
            self._receive.close()
            self._done.set()

    def close(self) -> None:
        """No more events: :meth:`run` ends once the queue is empty."""
        self._send.close()

    def _failed(self) -> None:
        self.failures += 1
        if self.failures == 1:
            logger.warning(
                "the on_event callback raised (ignored; later failures are not logged)",
                exc_info=True,
            )


def _leftover(receive: Any) -> list[Any]:
    left = []
    while True:
        try:
            left.append(receive.receive_nowait())
        except Exception:  # empty, closed or ended
            return left


def _close(outcome: Any) -> None:
    close = getattr(outcome, "close", None)
    if close is not None:
        close()

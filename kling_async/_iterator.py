"""The consumer's side of a batch: :class:`BatchIterator`, an async iterator of results."""

from __future__ import annotations

import contextlib
from collections.abc import Coroutine
from typing import Any, Protocol

import anyio
import anyio.lowlevel

from ._pipe import ResultPipe
from ._results import BatchProgress, JobResult

__all__ = ["BatchControl", "BatchIterator"]


class BatchControl(Protocol):
    """What the consumer's side needs of a running batch (:class:`~._batch.Batch` has it)."""

    @property
    def journaled(self) -> bool:
        """Whether the batch keeps a journal (taken results are then marked in it)."""

    def progress(self) -> BatchProgress:
        """The batch's counts so far."""

    def running_task_ids(self) -> tuple[str, ...]:
        """Tasks submitted and not yet reported."""

    def cancel(self) -> None:
        """Stop submitting and tracking."""

    def delivered(self, key: str) -> None:
        """The consumer is done with ``key``'s result."""

    def consumer_done(self) -> None:
        """The consumer has left the stream."""

    async def wait_finished(self) -> None:
        """Wait until the batch has stopped."""

    def outcome(self) -> None:
        """Raise what stopped the batch, if anything did."""


class BatchIterator:
    """The consumer's side of a batch: an async iterator of :class:`JobResult`.

    Leaving an ``async for`` over it (``break``, an exception, cancellation) cancels the batch.
    It is also an async context manager, for callers that want the cancellation to be explicit::

        async with client.run_batch(jobs) as results:
            async for result in results:
                ...

    With a journal, a result counts as taken (and is not reported by a rerun) once the consumer
    asks for the next one, or leaves ``async with`` (or calls :meth:`aclose`) without an
    exception.  A crash while the consumer holds a result reports that one result again.
    """

    def __init__(self, batch: BatchControl, pipe: ResultPipe) -> None:
        self._batch = batch
        self._pipe = pipe
        self._held: str | None = None  # key of the result the consumer holds

    @property
    def progress(self) -> BatchProgress:
        """The batch's counts so far: submitted, running, succeeded, failed."""
        return self._batch.progress()

    @property
    def running_task_ids(self) -> tuple[str, ...]:
        """Ids of the tasks submitted and not yet reported.

        Once the batch has stopped early (the loop left, Ctrl-C, a fatal error), these tasks
        still run on the server, or ended without their result reaching the consumer (it came
        in just before or with the stop), and are paid for: look them up later (``client.get_task``,
        ``client.track``, ``kling-async status``), or use a journal, with which a rerun picks
        them up by itself.
        """
        return self._batch.running_task_ids()

    def __aiter__(self) -> _Loop:
        # A loop of its own, which only the ``async for`` holds: leaving the loop (``break``)
        # drops it at once, also while the caller keeps this iterator by name (to read
        # ``running_task_ids`` afterwards), which would otherwise keep the batch submitting.
        return _Loop(self)

    async def __anext__(self) -> JobResult:
        batch = self._batch
        try:
            if self._held is not None:
                key, self._held = self._held, None
                batch.delivered(key)
            # A result already waiting is taken without a trip through the event loop (a
            # cancelled consumer still sees its cancellation here).
            await anyio.lowlevel.checkpoint_if_cancelled()
            result = self._pipe.take_nowait()
            if result is None:
                result = await self._pipe.take()
        except anyio.EndOfStream:
            self._pipe.abandon()
            batch.consumer_done()
            await batch.wait_finished()
            batch.outcome()
            raise StopAsyncIteration from None
        except BaseException:
            batch.cancel()
            batch.consumer_done()
            raise
        if batch.journaled:
            self._held = result.key
        return result

    async def aclose(self) -> None:
        """Cancel the batch (if still running) and wait until it has stopped.

        The result taken last counts as handled (see the class docstring).
        """
        self._batch.cancel()
        if self._held is not None:
            key, self._held = self._held, None
            self._batch.delivered(key)
        self._batch.consumer_done()
        await self._batch.wait_finished()
        self._pipe.abandon()

    async def __aenter__(self) -> BatchIterator:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        if exc_type is not None:
            self._held = None  # the consumer failed while holding it: report it again
        await self.aclose()

    def __del__(self) -> None:
        # An abandoned iterator (``break`` out of ``async for``) must not leave the batch running.
        with contextlib.suppress(Exception):  # interpreter shutdown
            self._batch.cancel()
            self._batch.consumer_done()
            self._pipe.abandon()


class _Loop:
    """One ``async for`` over a :class:`BatchIterator`; its end (however reached) stops the batch.

    Python tells an iterator nothing when a loop over it is left with ``break``: only that the
    last reference to what ``__aiter__`` returned goes away, which is this object's.  Nothing
    but the stop happens here: the iterator, still held, marks its last result taken when left
    with ``async with`` (or ``aclose()``), and lets a journal close when it goes.
    """

    __slots__ = ("_results",)

    def __init__(self, results: BatchIterator) -> None:
        self._results = results

    def __aiter__(self) -> _Loop:
        return self

    def __anext__(self) -> Coroutine[Any, Any, JobResult]:
        return self._results.__anext__()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown
            self._results._batch.cancel()

"""The batch engine behind :meth:`KlingClient.run_batch` and :meth:`KlingClient.track`.

A batch runs in the client's task group, never inside the consumer's ``async for``: jobs are read
lazily, each takes a task slot (:mod:`._slots`) before its submit and gives it back when its task
ends, one :class:`~._tracker.Tracker` polls every live task, and results travel to the consumer
through a memory object stream.  Leaving the loop cancels the batch.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ._errors import (
    ConcurrencyLimitError,
    KlingError,
    TaskCancelledError,
    TaskFailedError,
    TaskTimedOutError,
    ValidationError,
)
from ._jobs import LipSyncJob
from ._results import JobResult, TaskSnapshot, TaskState
from ._slots import TaskSlots
from ._tracker import Tracker
from .dialects import Submit

if TYPE_CHECKING:
    from ._client import KlingClient

__all__ = ["Batch", "BatchIterator"]

logger = logging.getLogger("kling_async")


class Batch:
    """One run of jobs (or tracked task ids) through a client.

    ``callback_url`` is passed to the dialect for every job (where your webhook receives the
    server's callbacks).  Results not yet taken by the consumer are bounded: the batch stops
    reading jobs while twice ``max_in_flight`` results wait.
    """

    def __init__(
        self,
        client: KlingClient,
        *,
        jobs: Iterable[LipSyncJob] | AsyncIterable[LipSyncJob] | None = None,
        task_ids: list[str] | None = None,
        stage: str | None = None,
        callback_url: str | None = None,
    ) -> None:
        self._client = client
        self._dialect = client.dialect
        self._jobs = jobs
        self._task_ids = task_ids
        self._stage = stage or client.dialect.default_stage
        self._callback_url = callback_url
        self._slots = TaskSlots(client.max_in_flight)
        self._credit = anyio.Semaphore(2 * client.max_in_flight)
        self._scope = anyio.CancelScope()
        self._finished = anyio.Event()
        self._first_answer = anyio.Event()
        self._canary_taken = False
        self._fatal: KlingError | None = None
        self._crash: BaseException | None = None
        self._live: dict[str, str] = {}  # task id -> job key, for tasks not yet reported
        self.counts = {"submitted": 0, "succeeded": 0, "failed": 0}
        self.tracker = Tracker(
            dialect=client.dialect,
            requester=client._requester,
            poll=client.poll,
            retry=client.retry,
            rng=client._rng,
            on_fatal=self._abort,
            callbacks=callback_url is not None,
        )

    def start(self, group: TaskGroup) -> BatchIterator:
        """Start the batch in ``group`` and return the iterator its consumer reads."""
        send, receive = anyio.create_memory_object_stream[JobResult](math.inf)
        group.start_soon(self._run, send)
        return BatchIterator(self, receive)

    def cancel(self) -> None:
        """Stop submitting and tracking; tasks already created keep running on the server."""
        self._scope.cancel()

    # -- running -------------------------------------------------------------------------

    async def _run(self, send: MemoryObjectSendStream[JobResult]) -> None:
        what = "tracking" if self._task_ids is not None else "batch"
        logger.info("%s started: max_in_flight=%d", what, self._slots.capacity)
        try:
            with self._scope:
                async with anyio.create_task_group() as outer:
                    outer.start_soon(self.tracker.run)
                    async with anyio.create_task_group() as jobs:
                        await self._feed(jobs, send)
                    outer.cancel_scope.cancel()
        except BaseException as exc:  # handed to the consumer, never to the client's group
            self._crash = exc
        finally:
            send.close()
            self._finished.set()
            self._log_end(what)

    async def _feed(self, group: TaskGroup, send: MemoryObjectSendStream[JobResult]) -> None:
        if self._task_ids is not None:
            for task_id in self._task_ids:
                await self._credit.acquire()
                group.start_soon(self._track_one, task_id, send)
            return
        index = 0
        async for job in _aiter(self._jobs or ()):
            await self._credit.acquire()
            await self._slots.acquire()
            group.start_soon(self._run_job, index, job, send)
            index += 1

    async def _run_job(
        self, index: int, job: LipSyncJob, send: MemoryObjectSendStream[JobResult]
    ) -> None:
        key = job.key if isinstance(job, LipSyncJob) and job.key else str(index)
        slot = _Slot(self._slots)
        task_id: str | None = None
        submitted_at: float | None = None
        polls = 0
        try:
            if not isinstance(job, LipSyncJob):
                raise ValidationError("job", f"must be a LipSyncJob, not {type(job).__name__}")
            self._dialect.check_job(job)
            flow = self._dialect.flow(job, callback_url=self._callback_url)
            step = next(flow)
            while True:
                snapshot = await self._create(step, slot)
                task_id = snapshot.task_id
                submitted_at = submitted_at or self._client._clock()
                self._live[task_id] = key
                self.counts["submitted"] += 1
                terminal, step_polls = await self.tracker.wait(snapshot, step.stage)
                polls += step_polls
                self._live.pop(task_id, None)
                try:
                    step = flow.send(terminal)
                except StopIteration as stop:
                    final: TaskSnapshot = stop.value
                    break
            result = self._result(key, final, submitted_at, polls)
        except KlingError as exc:
            if exc.fatal:
                self._abort(exc)
                return
            result = JobResult(
                key=key,
                task_id=task_id,
                state=TaskState.FAILED,
                error=exc,
                submitted_at=submitted_at,
                finished_at=self._client._clock(),
                polls=polls,
            )
        finally:
            slot.release()
        if task_id is not None:
            self._live.pop(task_id, None)
            self._slots.finished()
        self.counts["succeeded" if result.ok else "failed"] += 1
        await send.send(result)

    async def _track_one(self, task_id: str, send: MemoryObjectSendStream[JobResult]) -> None:
        self._live[task_id] = task_id
        snapshot = TaskSnapshot(task_id=task_id, state=TaskState.SUBMITTED)
        terminal, polls = await self.tracker.wait(snapshot, self._stage)
        self._live.pop(task_id, None)
        result = self._result(task_id, terminal, None, polls)
        self.counts["succeeded" if result.ok else "failed"] += 1
        await send.send(result)

    async def _create(self, step: Submit, slot: _Slot) -> TaskSnapshot:
        """Submit one step, waiting out 1303 refusals; the first submit of a batch goes alone."""
        canary = not self._canary_taken
        self._canary_taken = True
        if not canary:
            # Until one submit has been answered, send no other: a bad key or an empty account
            # then costs one request, not one per job.
            await self._first_answer.wait()
        refusals = 0
        retry = self._client.retry
        while True:
            try:
                snapshot = await self._client._requester.call(
                    step.request,
                    lambda response: self._dialect.parse_submit(step.stage, response),
                    retry_concurrency_limit=False,
                )
            except ConcurrencyLimitError:
                self._first_answer.set()
                refusals += 1
                self._slots.shrink()
                slot.release()
                delay = min(retry.concurrency_delay * 2 ** (refusals - 1), retry.max_delay)
                logger.debug("1303: %d tasks running; waiting %.2f s", self._slots.in_use, delay)
                await anyio.sleep(delay)
                await slot.acquire()
                continue
            except BaseException as exc:
                # Any answer but a fatal one proves the account usable: let the others go.
                if not (isinstance(exc, KlingError) and exc.fatal):
                    self._first_answer.set()
                raise
            self._first_answer.set()
            return snapshot

    def _result(
        self, key: str, snapshot: TaskSnapshot, submitted_at: float | None, polls: int
    ) -> JobResult:
        error: KlingError | None = None
        if snapshot.state is TaskState.FAILED:
            error = TaskFailedError(
                snapshot.message or "the task failed without a reason",
                task_id=snapshot.task_id,
                code=snapshot.error_code,
            )
        elif snapshot.state is TaskState.TIMED_OUT:
            error = TaskTimedOutError(snapshot.task_id, self._client.poll.timeout)
        elif snapshot.state is TaskState.CANCELLED:
            error = TaskCancelledError(snapshot.task_id)
        return JobResult(
            key=key,
            task_id=snapshot.task_id,
            state=snapshot.state,
            video_urls=snapshot.video_urls,
            error=error,
            submitted_at=submitted_at,
            finished_at=self._client._clock(),
            polls=polls,
        )

    # -- ending --------------------------------------------------------------------------

    def _abort(self, error: KlingError) -> None:
        if self._fatal is None:
            self._fatal = error
            logger.error("batch stopped: %s", error)
        self._scope.cancel()

    def _log_end(self, what: str) -> None:
        logger.info(
            "%s ended: %d submitted, %d succeeded, %d failed",
            what,
            self.counts["submitted"],
            self.counts["succeeded"],
            self.counts["failed"],
        )
        if self._live:
            logger.info(
                "%d tasks still run on the server, unreported: %s",
                len(self._live),
                ", ".join(sorted(self._live)),
            )

    def outcome(self) -> None:
        """Raise what stopped the batch, if anything did (called once the stream has ended)."""
        if self._fatal is not None:
            self._fatal.submitted_task_ids = tuple(self._live)
            raise self._fatal
        crash = self._crash
        if crash is not None and not isinstance(crash, anyio.get_cancelled_exc_class()):
            raise crash


class BatchIterator:
    """The consumer's side of a batch: an async iterator of :class:`JobResult`.

    Leaving an ``async for`` over it (``break``, an exception, cancellation) cancels the batch.
    It is also an async context manager, for callers that want the cancellation to be explicit::

        async with client.run_batch(jobs) as results:
            async for result in results:
                ...
    """

    def __init__(self, batch: Batch, receive: MemoryObjectReceiveStream[JobResult]) -> None:
        self._batch = batch
        self._receive = receive

    def __aiter__(self) -> BatchIterator:
        return self

    async def __anext__(self) -> JobResult:
        try:
            result = await self._receive.receive()
        except anyio.EndOfStream:
            self._receive.close()
            self._batch.outcome()
            raise StopAsyncIteration from None
        except BaseException:
            self._batch.cancel()
            raise
        self._batch._credit.release()
        return result

    async def aclose(self) -> None:
        """Cancel the batch (if still running) and wait until it has stopped."""
        self._batch.cancel()
        await self._batch._finished.wait()
        self._receive.close()

    async def __aenter__(self) -> BatchIterator:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __del__(self) -> None:
        # An abandoned iterator (``break`` out of ``async for``) must not leave the batch running.
        with contextlib.suppress(Exception):  # interpreter shutdown
            self._batch.cancel()
            self._receive.close()


class _Slot:
    """One job's hold on a task slot, released at most once however the job ends."""

    __slots__ = ("_held", "_slots")

    def __init__(self, slots: TaskSlots) -> None:
        self._slots = slots
        self._held = True  # the feeder acquired it before starting the job

    def release(self) -> None:
        if self._held:
            self._held = False
            self._slots.release()

    async def acquire(self) -> None:
        await self._slots.acquire()
        self._held = True


async def _aiter(jobs: Iterable[Any] | AsyncIterable[Any]) -> AsyncIterator[Any]:
    if isinstance(jobs, AsyncIterable):
        async for job in jobs:
            yield job
    else:
        for job in jobs:
            yield job

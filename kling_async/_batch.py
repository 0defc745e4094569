"""The batch engine behind :meth:`KlingClient.run_batch` and :meth:`KlingClient.track`.

A batch runs in the client's task group, never inside the consumer's ``async for``: jobs are read
lazily, each takes a task slot (:mod:`._slots`) before its submit and gives it back when its task
ends, one :class:`~._tracker.Tracker` polls every live task, and results travel to the consumer
through a memory object stream.  Leaving the loop cancels the batch.

With ``journal=PATH`` the batch keeps each job's progress in a journal (:mod:`._journal`) and
a rerun resumes it; :mod:`._resume` decides, per job and per submit, what the journal allows.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import AsyncIterable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import anyio.lowlevel
import attrs
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectSendStream

from ._errors import (
    ConcurrencyLimitError,
    ConnectError,
    KlingError,
    RateLimitError,
    TaskCancelledError,
    TaskFailedError,
    TaskTimedOutError,
    TransportTimeout,
    ValidationError,
)
from ._iterator import BatchIterator
from ._jobs import LipSyncJob
from ._results import BatchProgress, JobResult, TaskSnapshot, TaskState
from ._resume import Resume
from ._slots import SlotHold, TaskSlots
from ._source import JobSource
from ._tracker import Tracker
from .dialects import Submit

if TYPE_CHECKING:
    from ._client import KlingClient

__all__ = ["Batch", "BatchIterator"]

logger = logging.getLogger("kling_async")

#: Seconds a stopping batch with a journal waits for the answers of submits already sent.
SUBMIT_GRACE = 5.0


class Batch:
    """One run of jobs (or tracked task ids) through a client.

    ``callback_url`` is passed to the dialect for every job (where your webhook receives the
    server's callbacks).  Results not yet taken by the consumer are bounded: the batch stops
    reading jobs while twice ``max_in_flight`` results wait.

    ``journal`` (a file path) makes the batch resumable: rerun the same jobs with the same
    journal after a crash and

    * a job whose result the consumer already took is not reported again; a finished job whose
      result was not taken yet is reported from the journal, without a request;
    * a job whose task exists is tracked, never submitted again;
    * a job whose submit was in flight when the run stopped is looked for among the server's
      recent tasks (dialects with a list query) and adopted when found; otherwise its result is
      a :class:`~kling_async.SubmitOutcomeUnknownError`, unless ``resubmit_unknown`` is True;
    * everything else is submitted.

    Keys must be unique within the batch (a job without ``key`` is keyed by its position, which
    only resumes correctly when the jobs come in the same order), and a key may not name a
    different job than the journal recorded, once that job may have created a task: both raise
    :class:`~kling_async.ValidationError` out of the loop.  See the README's "Resuming" section.

    ``download_to`` (a directory) saves each successful video there before its result is
    reported (:meth:`KlingClient.download`); ``JobResult.path`` says where.  A download that
    fails leaves the result ``ok`` (the video exists, its URL still works) with ``path`` None
    and ``error`` set to the :class:`~kling_async.DownloadError`.
    """

    def __init__(
        self,
        client: KlingClient,
        *,
        jobs: Iterable[LipSyncJob] | AsyncIterable[LipSyncJob] | None = None,
        task_ids: list[str] | None = None,
        stage: str | None = None,
        callback_url: str | None = None,
        journal: str | os.PathLike[str] | None = None,
        resubmit_unknown: bool = False,
        download_to: str | os.PathLike[str] | None = None,
    ) -> None:
        if journal is not None and not isinstance(journal, (str, os.PathLike)):
            raise ValidationError("journal", "must be a file path")
        if journal is not None and task_ids is not None:
            raise ValidationError("journal", "only run_batch keeps a journal, not track")
        if not isinstance(resubmit_unknown, bool):
            raise ValidationError("resubmit_unknown", "must be True or False")
        if download_to is not None and not isinstance(download_to, (str, os.PathLike)):
            raise ValidationError("download_to", "must be a directory path")
        self._client = client
        self._dialect = client.dialect
        self._jobs = jobs
        self._task_ids = task_ids
        self._stage = stage or client.dialect.default_stage
        self._callback_url = callback_url
        self._journal_path = journal
        self._resubmit_unknown = resubmit_unknown
        self._download_to = Path(download_to) if download_to is not None else None
        self.resume: Resume | None = None
        self._slots = TaskSlots(client.max_in_flight)
        # fast_acquire: taking a free credit needs no trip through the event loop.
        self._credit = anyio.Semaphore(2 * client.max_in_flight, fast_acquire=True)
        self._scope = anyio.CancelScope()
        self._finished = anyio.Event()
        self._consumer_done = anyio.Event()
        self._first_answer = anyio.Event()
        self._canary_taken = False
        self._fatal: KlingError | None = None
        self._crash: BaseException | None = None
        self._live: dict[str, str] = {}  # task id -> job key, for tasks not yet reported
        self._submits: set[anyio.CancelScope] = set()  # journaled submits on their way
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

    def progress(self) -> BatchProgress:
        """Counts of the batch so far (what a progress display shows)."""
        return BatchProgress(
            submitted=self.counts["submitted"],
            running=len(self._live),
            succeeded=self.counts["succeeded"],
            failed=self.counts["failed"],
        )

    def cancel(self) -> None:
        """Stop submitting and tracking; tasks already created keep running on the server.

        With a journal, submits already on their way get :data:`SUBMIT_GRACE` seconds to be
        answered, so that the journal knows their tasks.
        """
        self._scope.cancel()
        if self._submits:  # (only while the batch runs: __del__ may call this later)
            deadline = anyio.current_time() + SUBMIT_GRACE
            for scope in self._submits:
                scope.deadline = min(scope.deadline, deadline)

    # -- running -------------------------------------------------------------------------

    async def _run(self, send: MemoryObjectSendStream[JobResult]) -> None:
        what = "tracking" if self._task_ids is not None else "batch"
        logger.info("%s started: max_in_flight=%d", what, self._slots.capacity)
        try:
            async with anyio.create_task_group() as marks:
                await self._run_jobs(send, marks)
                if self.resume is not None:
                    # The consumer marks the results it takes until it leaves the stream.
                    await self._consumer_done.wait()
                marks.cancel_scope.cancel()
        finally:
            await self._close_journal()
            self._finished.set()
            self._log_end(what)

    async def _run_jobs(self, send: MemoryObjectSendStream[JobResult], marks: TaskGroup) -> None:
        try:
            with self._scope:
                if self._journal_path is not None:
                    self.resume = await Resume.open(
                        self._client, self._journal_path, resubmit_unknown=self._resubmit_unknown
                    )
                    marks.start_soon(self.resume.journal.commit_marks)
                async with anyio.create_task_group() as outer:
                    outer.start_soon(self.tracker.run)
                    async with anyio.create_task_group() as jobs:
                        await self._feed(jobs, send)
                    outer.cancel_scope.cancel()
        except BaseException as exc:  # handed to the consumer, never to the client's group
            self._crash = exc
        finally:
            send.close()

    async def _close_journal(self) -> None:
        if self.resume is None:
            return
        with anyio.CancelScope(shield=True):
            try:
                await self.resume.journal.close()
            except KlingError as exc:
                logger.error("closing the journal failed: %s", exc)
                self._fatal = self._fatal or exc

    async def _feed(self, group: TaskGroup, send: MemoryObjectSendStream[JobResult]) -> None:
        if self._task_ids is not None:
            for task_id in self._task_ids:
                await self._credit.acquire()
                group.start_soon(self._track_one, task_id, send)
            return
        source = JobSource(self._jobs or (), self.resume)
        for _ in range(self._slots.capacity):
            group.start_soon(self._runner, source, send)

    async def _runner(self, source: JobSource, send: MemoryObjectSendStream[JobResult]) -> None:
        """Run jobs one after another, each holding a task slot; one runner per slot.

        Not a task per job: spawning it and handing it the slot cost more trips through the
        event loop than the job's own two requests (benchmarks/README.md, "Overhead").
        """
        while True:
            await self._credit.acquire()
            await self._slots.acquire()
            try:
                item = await source.next()
            except ValidationError as exc:
                self._slots.release()
                self._abort(exc)  # duplicate key, or a changed job: stop, resumably
                return
            except BaseException:
                self._slots.release()
                raise
            if item is None:
                self._slots.release()
                self._credit.release()
                return
            if isinstance(item, JobResult):  # finished in an earlier run, not yet taken
                self._slots.release()
                await self._report(item, send)
                continue
            await self._run_job(*item, send)

    async def _run_job(
        self, key: str, job: LipSyncJob, send: MemoryObjectSendStream[JobResult]
    ) -> None:
        slot = SlotHold(self._slots)
        task_id: str | None = None
        submitted_at: float | None = None
        polls = 0
        resume = self.resume if isinstance(job, LipSyncJob) else None
        try:
            if not isinstance(job, LipSyncJob):
                raise ValidationError("job", f"must be a LipSyncJob, not {type(job).__name__}")
            self._dialect.check_job(job)
            flow = self._dialect.flow(job, callback_url=self._callback_url)
            step = next(flow)
            while True:
                if resume is None:
                    snapshot = await self._create(step, slot)
                else:
                    submit = functools.partial(self._create, step, slot, key)
                    snapshot = await resume.open_step(key, job, step, submit)
                task_id = snapshot.task_id
                submitted_at = submitted_at or (
                    resume.intent_at(key, step.stage) if resume else None
                )
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
        if resume is not None:
            try:
                # Recorded before it is handed on: a crash after this reports it from here.
                await resume.finished(result)
            except KlingError as exc:
                self._abort(exc)
                return
        await self._report(result, send)

    async def _report(self, result: JobResult, send: MemoryObjectSendStream[JobResult]) -> None:
        """Save the video where asked, count the result and hand it to the consumer."""
        if self._download_to is not None and result.ok and result.path is None:
            try:
                path = await self._client.download(result, self._download_to)
            except KlingError as exc:
                logger.warning("download of %s failed: %s", result.key, exc)
                result = attrs.evolve(result, error=exc)
            else:
                result = attrs.evolve(result, path=path)
        self.counts["succeeded" if result.ok else "failed"] += 1
        # The stream is unbounded (the credit semaphore bounds it): no waiting to send.  The
        # checkpoint comes *after* the result is handed over, so that a consumer woken by it
        # runs before this runner submits another job: a consumer that leaves the loop on this
        # result must find no newer submit on its way.
        await anyio.lowlevel.checkpoint_if_cancelled()
        send.send_nowait(result)
        await anyio.lowlevel.checkpoint()

    async def _track_one(self, task_id: str, send: MemoryObjectSendStream[JobResult]) -> None:
        self._live[task_id] = task_id
        snapshot = TaskSnapshot(task_id=task_id, state=TaskState.SUBMITTED)
        terminal, polls = await self.tracker.wait(snapshot, self._stage)
        self._live.pop(task_id, None)
        await self._report(self._result(task_id, terminal, None, polls), send)

    async def _create(self, step: Submit, slot: SlotHold, key: str | None = None) -> TaskSnapshot:
        """Submit one step, waiting out 1303 refusals; the first submit of a batch goes alone.

        With a ``key`` (a journaled job) the journal records the intent before each attempt
        leaves, and the task id (or the refusal) as soon as the answer says.
        """
        canary = not self._canary_taken
        self._canary_taken = True
        if not canary and not self._first_answer.is_set():
            # Until one submit has been answered, send no other: a bad key or an empty account
            # then costs one request, not one per job.
            await self._first_answer.wait()
        else:
            # No trip through the event loop, but a job started just before the batch was told
            # to stop must not send its submit (anyio delivers that cancellation only later).
            await anyio.lowlevel.checkpoint_if_cancelled()
        refusals = 0
        retry = self._client.retry
        resume = self.resume if key is not None else None
        while True:
            try:
                if resume is not None and key is not None:
                    snapshot = await self._send_journaled(step, resume, key)
                else:
                    snapshot = await self._send(step)
            except ConcurrencyLimitError:
                self._first_answer.set()
                if resume is not None and key is not None:
                    await resume.journal.refused(key, step.stage)
                refusals += 1
                self._slots.shrink()
                slot.release()
                delay = min(retry.concurrency_delay * 2 ** (refusals - 1), retry.max_delay)
                logger.debug("1303: %d tasks running; waiting %.2f s", self._slots.in_use, delay)
                await anyio.sleep(delay)
                await slot.acquire()
                continue
            except RateLimitError as exc:
                # 1302 after the requester's own retries: still not a reason to fail a job
                # whose task was never created.  Wait longer, keeping the slot.
                self._first_answer.set()
                if resume is not None and key is not None:
                    await resume.journal.refused(key, step.stage)
                refusals += 1
                delay = min(retry.concurrency_delay * 2 ** (refusals - 1), retry.max_delay)
                logger.debug("1302: waiting %.2f s", max(delay, exc.retry_after or 0.0))
                await anyio.sleep(max(delay, exc.retry_after or 0.0))
                continue
            except BaseException as exc:
                if canary and isinstance(exc, ConnectError):
                    # The server cannot be reached at all: every job would fail the same way.
                    self._abort(exc)
                # Any answer but a fatal one proves the account usable: let the others go.
                if not (isinstance(exc, KlingError) and exc.fatal):
                    self._first_answer.set()
                if resume is not None and key is not None and isinstance(exc, KlingError):
                    return await resume.submit_failed(key, step.stage, exc)
                raise
            self._first_answer.set()
            if resume is not None and key is not None:
                await resume.created(key, step.stage, snapshot)
            return snapshot

    async def _send(self, step: Submit) -> TaskSnapshot:
        return await self._client._requester.call(
            step.request,
            lambda response: self._dialect.parse_submit(step.stage, response),
            retry_concurrency_limit=False,
        )

    async def _send_journaled(self, step: Submit, resume: Resume, key: str) -> TaskSnapshot:
        """Send ``step`` with its intent on disk first; a stopping batch lets it finish.

        Cut off mid-request, a submit's outcome would be unknown to the next run: so once the
        intent is recorded the request runs shielded, and a batch told to stop gives it
        :data:`SUBMIT_GRACE` seconds to be answered (see :meth:`cancel`).
        """
        await resume.journal.submitting(key, step.stage, self._client._clock())
        try:
            await anyio.lowlevel.checkpoint_if_cancelled()
        except anyio.get_cancelled_exc_class():
            await resume.journal.refused(key, step.stage)  # never sent
            raise
        scope = anyio.CancelScope(shield=True)
        self._submits.add(scope)
        try:
            with scope:
                return await self._send(step)
        finally:
            self._submits.discard(scope)
        # The grace ran out: the intent stays unresolved, as after a crash.
        await anyio.lowlevel.checkpoint()  # raises the batch's cancellation
        raise TransportTimeout("the batch stopped before the submit was answered")

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
        self.cancel()

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

    def delivered(self, key: str) -> None:
        """The consumer is done with ``key``'s result: a rerun will not report it again."""
        if self.resume is not None:
            self.resume.journal.reported(key)

    def consumer_done(self) -> None:
        """The consumer has left the stream: the journal may close."""
        self._consumer_done.set()

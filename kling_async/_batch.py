"""The batch engine behind :meth:`KlingClient.run_batch` and :meth:`KlingClient.track`.

A batch runs in the client's task group, never inside the consumer's ``async for``: jobs are read
lazily, each takes a task slot (:mod:`._slots`) before its submit and gives it back when its task
ends, one :class:`~._tracker.Tracker` polls every live task, :mod:`._submitter` sends the
submits, and results travel to the consumer through a :class:`~._pipe.ResultPipe`.  Leaving the
loop cancels the batch.

With ``journal=PATH`` the batch keeps each job's progress in a journal (:mod:`.journal._sqlite`) and
a rerun resumes it; :mod:`._resume` decides, per job and per submit, what the journal allows.
With a shared (PostgreSQL) journal one worker polls the server for all (:mod:`._shared_poll`).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import AsyncIterable, Callable, Iterable
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import attrs
from anyio.abc import TaskGroup

from ._batch_report import check_batch_options, job_result, log_batch_end
from ._budget import Budget, BudgetLedger
from ._client_view import ClientView
from ._download import BatchSaver, writable_folder
from ._emit import EventSink, check_callback
from ._errors import KlingError, ValidationError
from ._identity import derive_external_id, new_batch_id
from ._iterator import BatchIterator
from ._jobs import LipSyncJob
from ._pipe import ResultPipe
from ._results import BatchProgress, JobResult, TaskSnapshot, TaskState
from ._resume import Resume
from ._shared_poll import SharedTracking
from ._slots import SlotHold, StuckTasks, TaskSlots, slot_wait_error
from ._source import JobSource
from ._submitter import Submitter
from ._tracker import Tracker
from ._tracking import track_all
from ._watch import Watch
from .events import Event
from .journal import PostgresJournal, SharedBackend
from .journal._claims import ClaimSource, SharedSlotHold, Slotless

__all__ = ["Batch", "BatchIterator"]

logger = logging.getLogger("kling_async")


class Batch:
    """One run of jobs (or tracked task ids) through a client.

    Built by :meth:`KlingClient.run_batch <kling_async.KlingClient.run_batch>` (whose docstring
    documents the options) and :meth:`KlingClient.track <kling_async.KlingClient.track>`.
    """

    def __init__(
        self,
        client: ClientView,
        *,
        jobs: Iterable[LipSyncJob] | AsyncIterable[LipSyncJob] | None = None,
        task_ids: list[str] | None = None,
        stage: str | None = None,
        callback_url: str | None = None,
        journal: str | os.PathLike[str] | PostgresJournal | None = None,
        resubmit_unknown: bool = False,
        retry_failed: bool = False,
        download_to: str | os.PathLike[str] | None = None,
        budget: Budget | None = None,
        on_event: Callable[[Event], Any] | None = None,
    ) -> None:
        check_batch_options(
            journal=journal,
            tracking=task_ids is not None,
            resubmit_unknown=resubmit_unknown,
            retry_failed=retry_failed,
            download_to=download_to,
        )
        self._client = client
        self._dialect = client.dialect
        self._jobs = jobs
        self._task_ids = task_ids
        self._stage = stage or client.dialect.default_stage
        self._callback_url = callback_url
        self._journal_path = journal
        self._resubmit_unknown = resubmit_unknown
        self._retry_failed = retry_failed
        self._download_to = Path(download_to) if download_to is not None else None
        folder = self._download_to
        self._saver = BatchSaver(client.download, folder) if folder is not None else None
        # Two-step dialects (identify-face first) pay for an identify-face call per job too.
        two_step = client.dialect.default_stage == "advanced-lip-sync"
        self.budget = BudgetLedger(budget, identify_face=two_step) if budget is not None else None
        self.units = 0.0  # what the server says the reported results cost
        self.resume: Resume | None = None
        self._slots = TaskSlots(client.max_in_flight)
        self.pipe = ResultPipe(2 * client.max_in_flight)
        self._scope = anyio.CancelScope()
        self._finished = anyio.Event()
        self._consumer_done = anyio.Event()
        self._fatal: KlingError | None = None
        self._crash: BaseException | None = None
        self._live: dict[str, str] = {}  # task id -> job key, for tasks not yet reported
        # Keys of successes whose video could not be saved: left unreported in the journal, so
        # that a rerun (the disk freed, the folder back) saves them instead of skipping them.
        self._unsaved: set[str] = set()
        # Task id -> job key of ended tasks whose result is not in the pipe yet (being journaled,
        # its video saved, or held back by a stop): paid for and unreported, so named at a stop.
        self._ending: dict[str, str] = {}
        self._submitter = Submitter(client, self._slots, self._abort, blocking=self.blocking)
        self._batch_id = new_batch_id()  # (with a journal, the journal's own is used)
        # Timed-out tasks still holding their slots, followed until they end.
        self._stuck = StuckTasks(
            self._slots, self._get_task, client.poll.max_interval, client.retry.max_attempts
        )
        self._named = 0
        self._shared: SharedTracking | None = None  # one poller for all workers of a journal
        check_callback(on_event)
        # Events: one sink, handed to each part that reports; None costs one test per site.
        self._emit = EventSink(on_event) if on_event is not None else None
        self._submitter.on_event = self._emit
        self.counts = {"submitted": 0, "succeeded": 0, "failed": 0}
        self.tracker = Tracker(
            dialect=client.dialect,
            requester=client.requester,
            poll=client.poll,
            retry=client.retry,
            rng=client.rng,
            on_fatal=self._abort,
            callbacks=callback_url is not None,
        )
        self.tracker.on_event = self._emit

    def start(self, group: TaskGroup) -> BatchIterator:
        """Start the batch in ``group`` and return the iterator its consumer reads."""
        group.start_soon(self._run)
        return BatchIterator(self, self.pipe)

    def running_task_ids(self) -> tuple[str, ...]:
        """Tasks submitted and not yet reported (after a stop: paid for).

        Running ones, and ended ones whose result the consumer has not taken: on its way (a
        video being saved), held back by the stop, or left in the pipe when the consumer went.
        """
        return tuple(dict.fromkeys((*self._live, *self._ending, *self.pipe.untaken())))

    def progress(self) -> BatchProgress:
        """Counts of the batch so far (what a progress display shows)."""
        return BatchProgress(
            submitted=self.counts["submitted"],
            running=len(self._live),
            succeeded=self.counts["succeeded"],
            failed=self.counts["failed"],
            retried=self.resume.retried if self.resume is not None else 0,
            units=self.units,
        )

    def cancel(self) -> None:
        """Stop submitting and tracking; tasks already created keep running on the server.

        With a journal, submits already on their way get a few seconds to be answered
        (:data:`~._submitter.SUBMIT_GRACE`), so that the journal knows their tasks.
        """
        self._scope.cancel()
        self._submitter.grace()

    # -- running -------------------------------------------------------------------------

    async def _run(self) -> None:
        what = "tracking" if self._task_ids is not None else "batch"
        logger.info("%s started: max_in_flight=%d", what, self._slots.capacity)
        try:
            async with anyio.create_task_group() as marks:
                if self._emit is not None:
                    self._emit.start(marks)
                await self._run_jobs(marks)
                if self.resume is not None:
                    # The consumer marks the results it takes until it leaves the stream.
                    await self._consumer_done.wait()
                if self._emit is not None:
                    await self._emit.finish()
                marks.cancel_scope.cancel()
        finally:
            await self._close_journal()
            self._finished.set()
            self._log_end(what)

    async def _run_jobs(self, marks: TaskGroup) -> None:
        try:
            with self._scope:
                if self._download_to is not None:
                    # Before anything is sent: a folder that cannot be written is a bad option.
                    await anyio.to_thread.run_sync(writable_folder, self._download_to)
                if self._journal_path is not None:
                    self.resume = await Resume.open(
                        self._client,
                        self._journal_path,
                        resubmit_unknown=self._resubmit_unknown,
                        reconciler=self._submitter.reconciler,
                        retry_failed=self._retry_failed,
                    )
                    marks.start_soon(self.resume.journal.commit_marks)
                    if self._emit is not None:
                        self.resume.on_event = self._emit
                        # (retry_failed runs the failures among them again)
                        self._emit.resumed(self.resume.journal.jobs(), not self._retry_failed)
                async with anyio.create_task_group() as outer:
                    outer.start_soon(self.tracker.run)
                    if self.resume is not None and isinstance(self.resume.journal, SharedBackend):
                        seat = self.resume.journal.poll_seat()
                        self._shared = SharedTracking(
                            self.tracker, seat, timeout=self._client.poll.timeout
                        )
                        outer.start_soon(self._shared.run)
                    self._stuck.group = outer
                    async with anyio.create_task_group() as jobs:
                        await self._feed(jobs)
                    self._stuck.group = None
                    outer.cancel_scope.cancel()
        except BaseException as exc:  # handed to the consumer, never to the client's group
            self._crash = exc
        finally:
            self.pipe.close()

    async def _close_journal(self) -> None:
        if self.resume is None:
            return
        with anyio.CancelScope(shield=True):
            try:
                await self.resume.journal.close()
            except KlingError as exc:
                logger.error("closing the journal failed: %s", exc)
                self._fatal = self._fatal or exc

    async def _feed(self, group: TaskGroup) -> None:
        if self._task_ids is not None:
            await self._track_all(self._task_ids)
            return
        source: JobSource | ClaimSource = JobSource(self._jobs or (), self.resume)
        if self.resume is not None and isinstance(self.resume.journal, SharedBackend):
            # Many workers, one batch: run whichever jobs this worker claims.
            source = ClaimSource(
                self.resume.journal, self._jobs or (), self._client.retry.max_slot_wait
            )
        for _ in range(self._slots.capacity):
            group.start_soon(self._runner, source)

    async def _runner(self, source: JobSource | ClaimSource) -> None:
        """Run jobs one after another, each holding a task slot; one runner per slot.

        Not a task per job: spawning it and handing it the slot cost more trips through the
        event loop than the job's own two requests (benchmarks/README.md, "Overhead").
        """
        while True:
            # No cancellation check here: Submitter.create yields before anything is sent.
            # (The non-waiting forms first: a coroutine call each saved, per job.)
            if not self.pipe.try_reserve():
                await self.pipe.reserve()
            # Every slot taken: the next job is read before the wait for one, so that a batch
            # whose last tasks timed out (keeping their slots) ends as soon as no job is left,
            # not after max_slot_wait.  (A shared journal's claim waits for a slot of the
            # account itself.)
            held = self._slots.try_acquire()
            try:
                item = source.next_nowait()
                if item is False:
                    item = await source.next()
            except ValidationError as exc:
                self._unslot(held)
                self._abort(exc)  # duplicate key, or a changed job: stop, resumably
                return
            except BaseException:
                self._unslot(held)
                raise
            if isinstance(item, Slotless):
                # No slot of the account for max_slot_wait: it ends unsubmitted (_run_job).
                self._unslot(held)
                held, item = False, (item.key, item.job)
            elif not held and isinstance(item, tuple):
                # A job that waits in vain for max_slot_wait ends as a value (_run_job).
                held = await self._slots.acquire_within(self._client.retry.max_slot_wait)
            if item is None:
                self._unslot(held)
                self.pipe.unreserve()
                return
            if isinstance(item, JobResult):  # finished in an earlier run, not yet taken
                self._unslot(held)
                await self._report(item)
                await anyio.lowlevel.checkpoint()  # (no submit, and so no yield, otherwise)
                continue
            await self._run_job(*item, held=held)

    def _unslot(self, held: bool) -> None:
        if held:
            self._slots.release()

    async def _run_job(self, key: str, job: LipSyncJob, *, held: bool = True) -> None:
        slot = SlotHold(self._slots, held=held)
        if self.resume is not None and self.resume.shared is not None:
            slot = SharedSlotHold(self._slots, self.resume.shared, key, held=held)
        task_id: str | None = None
        submitted_at: float | None = None
        polls = 0
        earlier: float | None = None  # units the steps before the last one cost (identify-face)
        resume = self.resume if isinstance(job, LipSyncJob) else None
        kept = False  # the slot stays held by a timed-out task (see StuckTasks)
        try:
            if not isinstance(job, LipSyncJob):
                raise ValidationError("job", f"must be a LipSyncJob, not {type(job).__name__}")
            if not held:
                raise slot_wait_error(self._client.retry.max_slot_wait, self.blocking())
            self._dialect.check_job(job)
            if self.budget is not None:
                await self.budget.reserve(key, job, resume)  # BudgetExceededError: not submitted
            if job.external_task_id is None and self._dialect.external_ids:
                job = attrs.evolve(job, external_task_id=self._external_id(key, resume))
            flow = self._dialect.flow(job, callback_url=self._callback_url)
            step = next(flow)
            while True:
                if resume is None:
                    snapshot = await self._submitter.create(
                        step, slot, key, video_url=job.video_url
                    )
                else:
                    submit = functools.partial(
                        self._submitter.create, step, slot, key, resume, video_url=job.video_url
                    )
                    snapshot = await resume.open_step(key, job, step, submit)
                task_id = snapshot.task_id
                submitted_at = submitted_at or (
                    resume.intent_at(key, step.stage) if resume else None
                )
                submitted_at = submitted_at or self._client.clock()
                self._live[task_id] = key
                self.counts["submitted"] += 1
                terminal, step_polls = await (self._shared or self.tracker).wait(
                    snapshot, step.stage
                )
                polls += step_polls
                self._live.pop(task_id, None)
                try:
                    step = flow.send(terminal)
                except StopIteration as stop:
                    final: TaskSnapshot = stop.value
                    break
                if terminal.units is not None:  # a step gone past: its charge is the job's too
                    earlier = (earlier or 0.0) + terminal.units
            result = self._result(key, final, submitted_at, polls)
            if earlier is not None:
                result = attrs.evolve(result, units=(result.units or 0.0) + earlier)
            if result.state is TaskState.TIMED_OUT and task_id is not None:
                kept = self._stuck.follow(task_id, step.stage, slot)
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
                finished_at=self._client.clock(),
                polls=polls,
                units=earlier,  # (a later step failed: the earlier ones were paid)
            )
        finally:
            if not kept:
                slot.release()
        if task_id is not None:
            self._live.pop(task_id, None)
            self._ending[task_id] = key  # until its result is in the pipe
            if not kept:
                self._slots.finished()
        if self.budget is not None:
            self.budget.settle(result)  # (journaled with the result, just below)
        if resume is not None:
            try:
                # Recorded before it is handed on: a crash after this reports it from here.
                await resume.finished(result)
            except KlingError as exc:
                # The journal failed (a full disk): the batch stops, but this result is known
                # and paid for.  Handed over all the same, as it is (no download: the batch is
                # stopping), before the stop, which lets nothing more through; unrecorded, a
                # rerun reports it again (at least once, never lost).
                self._hand_over(result)
                self._abort(exc)
                return
        if self._download_to is not None or self._scope.cancel_called:
            await self._report(result)
        else:  # what _report does then, without a coroutine per job
            self._hand_over(result)
        if task_id is None:  # failed before any submit was answered: maybe without a yield
            await anyio.lowlevel.checkpoint()

    def _hand_over(self, result: JobResult) -> None:
        """Count ``result`` and put it in the pipe (its place was reserved), as it is."""
        self._count(result)
        self._put(result)

    def _count(self, result: JobResult) -> None:
        self.counts["succeeded" if result.ok else "failed"] += 1
        self.units += result.units or 0.0

    def _put(self, result: JobResult) -> None:
        """Say ``result`` finished and put it in the pipe: from here on the pipe names it."""
        if self._emit is not None:
            self._emit.finished(result)
        self.pipe.put(result)
        if result.task_id is not None:
            self._ending.pop(result.task_id, None)

    async def _report(self, result: JobResult) -> None:
        """Save the video where asked, count the result and hand it to the consumer."""
        task_id = result.task_id  # named if the batch stops before the result is in the pipe
        if task_id is not None:
            self._ending[task_id] = result.key  # (a result of an earlier run too)
        if self._saver is not None and result.ok and result.path is None:
            result = await self._saver.save(result, self._emit)
            if result.error is not None:
                self._unsaved.add(result.key)
        self._count(result)
        if self._scope.cancel_called:
            # A stopped batch hands over nothing more (after a fatal error the consumer still
            # reads what came before it): the result stays named in ``_ending``.  Only the
            # batch's own scope: when an outer one is cancelled, the consumer is leaving too and
            # reads nothing more anyway.
            await anyio.lowlevel.checkpoint_if_cancelled()
        # No waiting: the result's place was reserved before its job started.  No yield here
        # either: the consumer woken by it runs before any runner sends another submit, because
        # Submitter.create yields before it sends.
        self._put(result)

    async def _track_all(self, task_ids: list[str]) -> None:
        """Track tasks created elsewhere (:func:`~._tracking.track_all`), reporting each end."""
        for task_id in task_ids:
            self._live[task_id] = task_id
        await track_all(self.tracker, task_ids, self._stage, self._tracked_end)

    def _tracked_end(self, watch: Watch) -> None:
        assert watch.result is not None
        self._live.pop(watch.task_id, None)
        if self._scope.cancel_called:
            # A stopped batch hands over nothing more (as in _report): the task stays named.
            self._ending[watch.task_id] = watch.task_id
            return
        result = self._result(watch.task_id, watch.result, None, watch.polls)
        self.counts["succeeded" if result.ok else "failed"] += 1
        self.pipe.put(result)

    async def _get_task(self, task_id: str, *, stage: str) -> TaskSnapshot:
        request = self._dialect.query_request(stage, task_id)
        parse = functools.partial(self._dialect.parse_query, stage, task_id)
        return await self._client.requester.call(request, parse)

    def blocking(self) -> tuple[str, ...]:
        """The tasks of this batch that hold task slots now (timed-out ones included)."""
        return (*self._stuck.ids, *self._live)

    def _external_id(self, key: str, resume: Resume | None) -> str:
        """The external task id the engine gives a job without one (see :mod:`._identity`)."""
        if resume is not None:
            return resume.external_id(key, self._dialect.default_stage)
        self._named += 1  # (keys may repeat without a journal: the count keeps ids unique)
        return derive_external_id(self._batch_id, f"{self._named}-{key}")

    def _result(
        self, key: str, snapshot: TaskSnapshot, submitted_at: float | None, polls: int
    ) -> JobResult:
        return job_result(
            key,
            snapshot,
            submitted_at=submitted_at,
            finished_at=self._client.clock(),
            polls=polls,
            timeout=self._client.poll.timeout,
            adopted=snapshot.task_id in self._submitter.reconciler.adopted,
        )

    # -- ending --------------------------------------------------------------------------

    def _abort(self, error: KlingError) -> None:
        if self._fatal is None:
            self._fatal = error
            logger.error("batch stopped: %s", error)
        self.cancel()

    def _log_end(self, what: str) -> None:
        resume = self.resume
        log_batch_end(
            what,
            self.counts,
            live={**self._live, **self._ending},
            all_reported=(
                resume.all_reported() if resume is not None and self._fatal is None else None
            ),
            retried=resume.retried if resume is not None else 0,
            quiet=self._emit is not None,
        )

    def outcome(self) -> None:
        """Raise what stopped the batch, if anything did (called once the stream has ended)."""
        if self._fatal is not None:
            self._fatal.submitted_task_ids = self.running_task_ids()
            raise self._fatal
        crash = self._crash
        if crash is not None and not isinstance(crash, anyio.get_cancelled_exc_class()):
            raise crash

    def delivered(self, key: str) -> None:
        """The consumer is done with ``key``'s result: a rerun reports it again only if unsaved."""
        if self.resume is not None and key not in self._unsaved:
            self.resume.journal.reported(key)

    def consumer_done(self) -> None:
        """The consumer has left the stream: the journal may close."""
        self._consumer_done.set()

    @property
    def journaled(self) -> bool:
        """Whether this batch keeps a journal (open now)."""
        return self.resume is not None

    @property
    def finished(self) -> bool:
        """Whether the batch has stopped (nothing more is submitted or tracked)."""
        return self._finished.is_set()

    async def wait_finished(self) -> None:
        """Wait until the batch has stopped."""
        await self._finished.wait()

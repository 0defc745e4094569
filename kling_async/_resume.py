"""What a batch with a journal does differently: per job, per submit, what the journal allows.

:class:`Resume` sits between :class:`~._batch.Batch` and its :class:`~.journal._sqlite.Journal`:

* :meth:`Resume.admit` decides, as each job is read, whether it runs, is reported from the
  journal or was reported already, and refuses duplicate keys and changed jobs;
* :meth:`Resume.open_step` starts one submit step: tracks the task an earlier run created,
  resolves a submit an earlier run left unanswered (:mod:`._reconcile`: found, sent again with
  the same external id, or :class:`~kling_async.SubmitOutcomeUnknownError`), or submits;
* :meth:`Resume.external_id` names the external task id a job's submit carries;
* :meth:`Resume.finished` records a result and whether a rerun keeps it (:func:`is_final`).
"""

from __future__ import annotations

import enum
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Final

from ._client_view import ClientView
from ._errors import SubmitOutcomeUnknownError, ValidationError, created_nothing
from ._identity import derive_external_id, new_batch_id
from ._jobs import LipSyncJob
from ._reconcile import ABSENT, Reconciler
from ._results import JobResult, TaskSnapshot, TaskState
from .dialects import Submit
from .events import Adopted, Event
from .journal import JournalBackend, PostgresJournal, SharedBackend, open_journal
from .journal._codec import request_hash
from .journal._sqlite import CREATED, SUBMITTING, JournalStage

__all__ = ["SKIP", "Resume", "is_final"]

logger = logging.getLogger("kling_async")


class _Skip(enum.Enum):
    SKIP = "skip"


#: :meth:`Resume.admit`'s answer for a job whose result the consumer has taken already.
SKIP: Final = _Skip.SKIP


def is_final(result: JobResult) -> bool:
    """Whether a rerun keeps ``result`` instead of running the job again.

    Kept: a success, a task that ran and failed, a request the server refused for good.  Not
    kept: a time-out or cancellation (the task may have finished since: it is tracked again), a
    :class:`SubmitOutcomeUnknownError` (looked for again) and a refusal that created nothing and
    may pass (1302, 1303, 5001, a connection never made: submitted again).
    """
    if result.state is TaskState.SUCCEEDED:
        return True
    if result.state is not TaskState.FAILED:
        return False
    error = result.error
    if isinstance(error, SubmitOutcomeUnknownError):
        return False
    return not (error is not None and created_nothing(error))


class Resume:
    """A batch's use of its journal; see the module docstring."""

    def __init__(
        self,
        journal: JournalBackend,
        reconciler: Reconciler,
        resubmit_unknown: bool,
        retry_failed: bool = False,
    ) -> None:
        self.journal = journal
        #: The journal when several workers share it, else None.  Asked once: isinstance()
        #: against a runtime-checkable Protocol walks its members each time (about 100 us, on
        #: every job's path).
        self.shared: SharedBackend | None = journal if isinstance(journal, SharedBackend) else None
        self._reconciler = reconciler
        self._resubmit_unknown = resubmit_unknown
        self._retry_failed = retry_failed
        #: Jobs that failed in an earlier run and run again in this one (``retry_failed``).
        self.retried = 0
        self._keys: set[str] = set()
        #: Jobs an earlier run reported already (skipped now), and how many of those failed.
        self.skipped = 0
        self.skipped_failed = 0
        self._fresh_ids: set[str] = set()  # keys retried after a failure (retry_failed)
        #: The batch's event sink (:mod:`kling_async.events`), if it has a callback.
        self.on_event: Callable[[Event], None] | None = None

    @classmethod
    async def open(
        cls,
        client: ClientView,
        path: str | os.PathLike[str] | PostgresJournal,
        *,
        resubmit_unknown: bool,
        reconciler: Reconciler,
        retry_failed: bool = False,
    ) -> Resume:
        """Open the journal ``path`` names (a file, or a shared database) for ``client``.

        ``reconciler`` uses it.

        The journal becomes the reconciler's ledger, and the clock offset an earlier run
        measured seeds its calibration (and is kept as it improves).
        """
        dialect = client.dialect
        journal = await open_journal(
            path,
            dialect=dialect.name,
            stage=dialect.default_stage,
            base_url=client.base_url,
            max_in_flight=client.max_in_flight,
        )
        reconciler.ledger = journal
        if journal.clock_offset is not None:
            reconciler.offset.lo, reconciler.offset.hi = journal.clock_offset
        reconciler.offset.on_change = journal.set_clock_offset
        if journal.external_ids_confirmed:
            reconciler.confirm_external()
        reconciler.on_confirm = journal.confirm_external_ids
        for record in journal.jobs():
            for stage in record.stages.values():
                if stage.adopted and stage.task_id is not None:
                    reconciler.adopted.add(stage.task_id)
        return cls(journal, reconciler, resubmit_unknown, retry_failed)

    # -- per job -------------------------------------------------------------------------

    def admit(self, key: str, job: object) -> JobResult | _Skip | None:
        """Decide what to do with ``job``: None (run it), a result to report, or :data:`SKIP`.

        Raises :class:`ValidationError` for a key seen before in this batch, and for a job that
        differs from the one the journal recorded under its key when that one may have created
        a task (a job that never did may change: its record starts over).
        """
        if key in self._keys:
            raise ValidationError(
                "key", f"{key!r} names two jobs of this batch; a journal needs unique keys"
            )
        self._keys.add(key)
        if not isinstance(job, LipSyncJob):
            return None  # fails at once, creates nothing: nothing to journal
        record = self.journal.job(key)
        # (Hashed only to compare: a new job's hash is the journal's to make, off the loop.)
        if record is not None and record.request_hash != request_hash(job):
            if record.may_have_task:
                raise ValidationError(
                    "key",
                    f"{key!r} names another job than the one this journal recorded under it"
                    " (its request differs) and that one may have created a task; give the"
                    " changed job a new key, or use a new journal",
                )
            record = None
        if record is None:
            self.journal.begin(key, job)
            return None
        if record.final and record.result is not None:
            if self._retry_failed and not record.result.ok:
                # A final failure: its task ended (or none was created), so a new one cannot
                # be paid twice.  The record starts over; the old task stays the key's in
                # memory, so it is never adopted for the new submit.  Its external id was
                # spent on the old task: the new submit gets a fresh one (see external_id).
                self.retried += 1
                self._fresh_ids.add(key)
                logger.debug("%s: failed in an earlier run, submitting it again", key)
                self.journal.begin(key, job)
                return None
            if not record.reported:
                return record.result
            self.skipped += 1
            self.skipped_failed += not record.result.ok
            return SKIP
        return None

    def all_reported(self) -> str | None:
        """What to say when every job of the batch had been reported by earlier runs."""
        if not self.skipped or self.skipped != len(self._keys):
            return None
        return (
            f"journal {self.journal.path}: all {self.skipped} jobs already reported,"
            f" {self.skipped_failed} failed; nothing to run (a new journal runs them again)"
        )

    async def finished(self, result: JobResult) -> None:
        """Record ``result`` (before it is handed to the consumer)."""
        if self.journal.job(result.key) is not None:
            await self.journal.finished(result, final=is_final(result))

    def intent_at(self, key: str, stage: str) -> float | None:
        """When ``key``'s ``stage`` submit was (first) about to leave, per the journal."""
        record = self.journal.job(key)
        step = record.stages.get(stage) if record is not None else None
        return step.intent_at if step is not None and step.intent_at else None

    def external_id(self, key: str, stage: str) -> str:
        """The external task id of ``key``'s ``stage`` submit.

        The one an earlier run sent (so that a lookup and a resend use the very same), else one
        derived from the journal's batch id and the key.
        """
        record = self.journal.job(key)
        step = record.stages.get(stage) if record is not None else None
        if step is not None and step.external_id is not None and step.status != CREATED:
            return step.external_id
        if key in self._fresh_ids:  # (kept with the submit's intent: a rerun sends the same)
            return derive_external_id(self.journal.batch_id, f"{key}~{new_batch_id()[:8]}")
        return derive_external_id(self.journal.batch_id, key)

    # -- per submit step -----------------------------------------------------------------

    def open_step(
        self,
        key: str,
        job: LipSyncJob,
        step: Submit,
        submit: Callable[..., Awaitable[TaskSnapshot]],
    ) -> Awaitable[TaskSnapshot]:
        """The first snapshot of ``step``'s task: known, adopted or sent with ``submit()``.

        A synchronous step (the official identify-face) whose answer the journal kept is not
        sent again: its session and faces come from the journal.
        """
        record = self.journal.job(key)
        known = record.stages.get(step.stage) if record is not None else None
        if known is None or known.status not in (CREATED, SUBMITTING):
            # (The submit's own coroutine, not one awaiting it: every step of the request
            # would pass through one more frame.)
            return submit()
        return self._reopen_step(key, job, step, submit, known)

    async def _reopen_step(
        self,
        key: str,
        job: LipSyncJob,
        step: Submit,
        submit: Callable[..., Awaitable[TaskSnapshot]],
        known: JournalStage,
    ) -> TaskSnapshot:
        """:meth:`open_step` of a stage an earlier run left created or unanswered."""
        if known.status == CREATED and known.task_id is not None:
            logger.debug("%s: %s task %s resumed from the journal", key, step.stage, known.task_id)
            return known.snapshot or TaskSnapshot(task_id=known.task_id, state=TaskState.SUBMITTED)
        if known.status == SUBMITTING:
            # An earlier run stopped with this submit in flight, or its answer was lost.
            await self.refresh()
            try:
                found = await self._reconciler.resolve(
                    key=key,
                    stage=step.stage,
                    # What that run sent (None from a journal older than external ids).
                    external_id=known.external_id,
                    video_url=job.video_url,
                    intent_at=known.intent_at,
                    answered_at=None,
                    cause=None,
                    # Not one of this run's submits on their way (they are what may yet show
                    # that external ids are kept): every one of those is another job's.
                    counted=False,
                )
            except SubmitOutcomeUnknownError:
                if not self._resubmit_unknown:
                    raise
                logger.warning("%s: submitting %s again (resubmit_unknown=True)", key, step.stage)
                return await submit()
            if found is not ABSENT:
                await self.journal.created(key, step.stage, found.task_id, adopted=True)
                if self.on_event is not None:
                    self.on_event(Adopted(key=key, stage=step.stage, task_id=found.task_id))
                return found
            return await submit(sent_before=True)
        return await submit()

    async def created(self, key: str, stage: str, snapshot: TaskSnapshot) -> None:
        """Record the task a submit created (a terminal answer is kept whole: identify-face)."""
        kept = snapshot if snapshot.state.is_terminal else None
        await self.journal.created(key, stage, snapshot.task_id, kept)

    # -- a journal shared by several workers (no-ops on a SQLite journal) ----------------------

    async def refresh(self) -> None:
        """Before a lookup: learn which tasks other workers' jobs own (not ours to adopt)."""
        if self.shared is not None:
            await self.shared.refresh()

    async def concurrency_refused(self, key: str) -> None:
        """A 1303 for ``key``'s submit: the shared limit drops for every worker."""
        if self.shared is not None:
            await self.shared.concurrency_refused(key)

    async def regain_slot(self, key: str) -> None:
        """Before ``key``'s submit goes again after a 1303: wait for a shared slot."""
        if self.shared is not None:
            await self.shared.regain_slot(key)
